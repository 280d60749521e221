"""LlamaIndex adapter tests: real LlamaIndex components on EFTLLM, no mocks.

Component                                   test module        models
EFTLLM complete / stream / async, metadata  test_completion    tiny random EFT family
  per-call weights vs the EFT formula,      test_completion    tiny family + each model alone
  with_weights, lazy loading, speculative
  event-loop responsiveness, cancellation   test_completion    tiny family
chat / stream_chat / achat / astream_chat   test_chat          tiny family vs eft_integrations.chat
  tool_required, allow_parallel_tool_calls, test_chat          tiny family (llguidance-forced)
  tool results through the chat template
  structured_predict, as_structured_llm,    test_chat          tiny family (response_format)
  FunctionCallingProgram
VectorStoreIndex + as_query_engine (sync,   test_rag           tiny family + all-MiniLM-L6-v2
  streaming, async), packing, token counting,
  chat engine (condense_plus_context)
FunctionAgent (streaming and not), ReAct    test_agents        tiny family
RAG answer from context, FunctionAgent      test_real (real)   SmolLM2-135M-Instruct (GGUF)
up-scaling and helpful/harmless weights,    test_toy (toy)     toy-world family (when shipped)
  SimpleChatEngine with fixed weights
"""
