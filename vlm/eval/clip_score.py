"""The CLIP scorer of `vlm data score`: image-caption cosine from a checkpoint of this system."""
from __future__ import annotations


class CheckpointClipScorer:
    """CLIP score (cosine of the normalised image and caption embeddings) from a checkpoint
    of this system; loads lazily in the process that scores (a Ray actor), on its GPU if any."""

    def __init__(self, path: str, *, verified: bool = False):
        self.path, self.verified = path, verified
        self._loaded = None

    @classmethod
    def resolved(cls, path: str) -> "CheckpointClipScorer":
        """Checks the checkpoint once, here in the driver (a run's corrupt newest one is
        skipped with a warning, a bad path or an explicitly named corrupt checkpoint fails
        naming it, not inside an actor); the actors then load that very checkpoint dir
        without hashing it again."""
        from vlm.checkpoint.resolve import resolve_verified

        return cls(str(resolve_verified(path).absolute()), verified=True)

    def _load(self):
        import torch

        from vlm.eval.load import load_eval_model

        model, text, cfg = load_eval_model(self.path, verify_files=not self.verified)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._loaded = (model.to(device), text, cfg.model.vision.image_size, device)

    def __call__(self, samples: list[dict]) -> list[float]:
        import torch

        from vlm.data.batches import decode_image
        from vlm.data.pixels import tower_norm

        if self._loaded is None:
            self._load()
        model, text, size, device = self._loaded
        mean, std = tower_norm(model.visual)
        images = torch.stack([decode_image(s, size, mean=mean, std=std) for s in samples]).to(device)
        tokens, eot = text([s.get("txt") or "" for s in samples])
        with torch.no_grad():
            sim = (model.encode_image(images) * model.encode_text(tokens.to(device), eot.to(device))).sum(-1)
        return sim.float().cpu().tolist()

    def __getstate__(self):
        return {"path": self.path, "verified": self.verified, "_loaded": None}  # ship the path, not a model
