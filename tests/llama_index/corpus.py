"""A small corpus of real-language documents on unrelated topics, and its vector index."""

from __future__ import annotations

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter

DOCUMENTS = {
    "veloria": (
        "Veloria is a small kingdom in the northern hills. Its capital is Markan, a walled "
        "city on the river Sel. Markan was founded by fishermen and is known for its stone "
        "bridges. The kingdom exports wool and dried fish."
    ),
    "bakery": (
        "Sourdough bread rises with wild yeast and lactic acid bacteria kept alive in a "
        "starter. Bakers feed the starter with flour and water every day, and a long cold "
        "proof gives the loaf its sour taste and open crumb."
    ),
    "volcano": (
        "A stratovolcano is built from alternating layers of lava and ash. Its eruptions are "
        "often explosive because the magma is thick and traps gas. Mount Fuji is a famous "
        "example of this kind of volcano."
    ),
    "chess": (
        "In chess, castling moves the king two squares towards a rook, and the rook jumps "
        "over the king. It is allowed only if neither piece has moved and the king is not "
        "in check or passing through an attacked square."
    ),
    "bees": (
        "Honey bees tell each other where flowers are with the waggle dance. The angle of "
        "the dance shows the direction relative to the sun, and its length shows the "
        "distance to the food."
    ),
    "tides": (
        "Ocean tides are caused mainly by the gravity of the Moon, and to a lesser degree "
        "the Sun. Most coasts see two high tides and two low tides every lunar day."
    ),
}
QUESTION = "What is the capital city of Veloria?"


def build_index(embed_model) -> VectorStoreIndex:
    """The DOCUMENTS in a vector index, one or two chunks each."""
    documents = [Document(text=text, doc_id=name) for name, text in DOCUMENTS.items()]
    return VectorStoreIndex.from_documents(
        documents,
        embed_model=embed_model,
        transformations=[SentenceSplitter(chunk_size=128, chunk_overlap=0)],
    )
