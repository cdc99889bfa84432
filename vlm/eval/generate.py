"""Caption decoding with a CoCa-style model (model.decoder over the causal text tower):
greedy or beam search, one image tower pass per batch of images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm.models.clip import CLIP
from vlm.data.tokenizer import TextEncoder


def _banned(text: TextEncoder) -> list[int]:
    """Ids a caption never continues with: <sot>, and <pad> where it is a token of its own
    (a clip tokenizer pads with id 0, the ordinary token "!", which captions may hold)."""
    return [text.sot_id] if text.kind == "clip" else [text.pad_id, text.sot_id]


def _next_log_probs(model: CLIP, prefix: torch.Tensor, image_tokens: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """prefix [N, t] (starting with <sot>), image_tokens [N, P, W] -> log-probabilities of
    token t+1, [N, V], with the `banned` ids (<pad>, <sot>) impossible."""
    eot = torch.full((prefix.shape[0],), prefix.shape[1] - 1, dtype=torch.long, device=prefix.device)
    text = model.text(prefix, eot)["tokens"]
    logits = model.decoder(text, image_tokens)[:, -1].float()
    logits[:, banned] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def _check(model: CLIP) -> None:
    if getattr(model, "decoder", None) is None:
        raise ValueError("this model has no caption decoder (model.decoder): train it with objective itg")


@torch.no_grad()
def greedy(model: CLIP, images: torch.Tensor, text: TextEncoder, *, max_tokens: int | None = None) -> list[list[int]]:
    """[N, 3, S, S] -> each image's token ids after <sot>, up to and without <eot>."""
    _check(model)
    max_tokens = max_tokens or text.context_length
    image_tokens = model.visual(images)["tokens"]
    n = images.shape[0]
    seq = torch.full((n, 1), text.sot_id, dtype=torch.long, device=images.device)
    done = torch.zeros(n, dtype=torch.bool, device=images.device)
    for _ in range(min(max_tokens, text.context_length) - 1):
        nxt = _next_log_probs(model, seq, image_tokens, _banned(text)).argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, text.eot_id), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == text.eot_id
        if done.all():
            break
    return [_strip(row.tolist(), text.eot_id) for row in seq[:, 1:]]


def _strip(ids: list[int], eot_id: int) -> list[int]:
    return ids[:ids.index(eot_id)] if eot_id in ids else ids


@torch.no_grad()
def beam_search(model: CLIP, images: torch.Tensor, text: TextEncoder, *, beam: int = 3,
                max_tokens: int | None = None, length_penalty: float = 0.6) -> list[list[int]]:
    """[N, 3, S, S] -> each image's best token ids (without <sot>/<eot>) under beam search;
    finished hypotheses are ranked by log-probability / length**length_penalty (GNMT), so
    that short captions are not favoured just for having fewer terms."""
    _check(model)
    if beam < 1:
        raise ValueError(f"beam must be at least 1, not {beam}")
    max_tokens = min(max_tokens or text.context_length, text.context_length)
    all_tokens = model.visual(images)["tokens"]
    results = []
    for image_tokens in all_tokens:
        seqs = torch.full((1, 1), text.sot_id, dtype=torch.long, device=images.device)
        scores = torch.zeros(1, device=images.device)
        finished: list[tuple[float, list[int]]] = []
        for _ in range(max_tokens - 1):
            logp = _next_log_probs(model, seqs, image_tokens.expand(len(seqs), -1, -1), _banned(text))
            total = (scores[:, None] + logp).view(-1)
            top = total.topk(min(beam, total.numel())).indices
            rows, toks = top // logp.shape[1], top % logp.shape[1]
            keep_rows, keep_toks, keep_scores = [], [], []
            for r, t, s in zip(rows.tolist(), toks.tolist(), total[top].tolist()):
                if t == text.eot_id:
                    words = seqs[r, 1:].tolist()
                    finished.append((s / max(1, len(words) + 1) ** length_penalty, words))
                else:
                    keep_rows.append(r), keep_toks.append(t), keep_scores.append(s)
            if len(finished) >= beam or not keep_rows:
                break
            seqs = torch.cat([seqs[keep_rows], torch.tensor(keep_toks, device=seqs.device)[:, None]], dim=1)
            scores = torch.tensor(keep_scores, device=seqs.device)
        if not finished:  # ran out of context: take the best open hypothesis
            finished = [(float(scores[0]), seqs[0, 1:].tolist())]
        results.append(max(finished, key=lambda f: f[0])[1])
    return results


def caption(model: CLIP, images: torch.Tensor, text: TextEncoder, *, beam: int = 1,
            max_tokens: int | None = None) -> list[str]:
    """[N, 3, S, S] -> N caption strings (greedy when beam == 1)."""
    ids = (greedy(model, images, text, max_tokens=max_tokens) if beam == 1
           else beam_search(model, images, text, beam=beam, max_tokens=max_tokens))
    return [text.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
