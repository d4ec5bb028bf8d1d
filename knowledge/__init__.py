"""The knowledge base: documents -> chunks -> embeddings -> FAISS, and retrieval for chat."""
