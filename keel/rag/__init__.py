"""Retrieval-augmented generation: documents, chunks, embeddings, index, answers, evaluation."""
