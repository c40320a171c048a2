"""Runtime core: archives, bundles, FAISS index. Never imports torch, timm or transformers."""
