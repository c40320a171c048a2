"""Online service (FastAPI) over a bundle and an index. Never imports torch, timm or transformers."""
