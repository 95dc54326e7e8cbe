"""The transfer actor: large files and streams between nodes, chunked, verified, resumable."""
