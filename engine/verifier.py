"""The cloud side: the cloud GPT with its own static KV cache, prefix injection, and verification of device
drafts in one forward over every token it has not seen yet (optionally conditioned on interval features).

The cloud runs where its weights are (`model.to("cuda")` puts it on a GPU, phi with it). Its interface stays on
the CPU: tokens, drafts, q and features come in as CPU tensors, tokens and verdicts go out as CPU tensors, and
the cloud's processed distributions are copied to the CPU before the acceptance policy and the draws, so every
draw comes from the caller's CPU generator whatever runs the forward (same seed, same image, up to float
rounding between devices)."""
from __future__ import annotations

import torch
from torch import Tensor

from ciar.models import GPT, SamplingConfig, model_probs, sample
from ciar.models.phi import IntervalProjection, check_phi_device

from .policy import AcceptancePolicy, speculative_sampling


class CloudVerifier:
    def __init__(self, model: GPT, sampling: SamplingConfig, phi: IntervalProjection | None = None,
                 policy: AcceptancePolicy = speculative_sampling) -> None:
        self.model, self.sampling, self.phi, self.policy = model.eval(), sampling, phi, policy
        self.device = next(model.parameters()).device
        check_phi_device(phi, self.device)
        self.forwards = 0
        self.tokens_processed = 0

    @torch.inference_mode()
    def start(self, cond: Tensor, num_tokens: int, feature_dim: int) -> None:
        self.batch, self.T = cond.shape[0], num_tokens
        cond = cond.to(self.device)
        self.cond = self.model.cfg_condition(cond) if self.sampling.guided else cond
        self.rows = self.cond.shape[0] // self.batch
        P = self.model.config.cls_token_num
        self.cache = self.model.new_cache(self.cond.shape[0], P + num_tokens)
        self.next_logits = self.model(cond=self.cond, cache=self.cache).logits[:, -1]  # predicts token n_ingested
        if self.device.type == "cuda":  # the prefill is the cloud's work of this call (the caller times it)
            torch.cuda.synchronize(self.device)
        self.forwards = 1  # the prefill counts: the cloud-only base then makes exactly T forwards per image
        self.tokens_processed = 0
        self.n_ingested = 0
        self.chosen: Tensor | None = None  # (B,) the token the cloud itself put at n_ingested (its last verdict's)
        self.features = torch.zeros(self.batch, num_tokens, feature_dim)
        self.has_features = torch.zeros(num_tokens, dtype=torch.bool)

    def _forward(self, tokens: Tensor, at: int) -> Tensor:
        """Ingest tokens (B, n) at image positions at.. ; returns logits (rows*B, n, V) predicting at+1..at+n."""
        P = self.model.config.cls_token_num
        extra = None
        if self.phi is not None:
            n = tokens.shape[1]
            known = self.has_features[at:at + n, None].to(self.device)
            f = self.phi(self.features[:, at:at + n].to(self.device)) * known
            extra = f.repeat(self.rows, 1, 1)
        out = self.model(tokens=tokens.to(self.device).repeat(self.rows, 1), cache=self.cache,
                         input_pos=torch.arange(P + at, P + at + tokens.shape[1], device=self.device),
                         extra_embeddings=extra)
        self.forwards += 1
        self.tokens_processed += tokens.shape[1]
        return out.logits

    @torch.inference_mode()
    def prefix(self, m: int, generator: torch.Generator) -> Tensor:
        """Prefix injection: the cloud writes the first m tokens alone (m forwards)."""
        out = torch.empty(self.batch, m, dtype=torch.long)
        for i in range(m):
            out[:, i] = sample(self._probs(self.next_logits), generator)
            if i + 1 < self.T:
                self.next_logits = self._forward(out[:, i:i + 1], i)[:, -1]
        self.n_ingested = m
        return out

    def _probs(self, logits: Tensor) -> Tensor:
        """The processed distribution, on the CPU (where the policy and the draws run)."""
        return model_probs(logits, self.sampling).cpu()

    def record_features(self, at: int, features: Tensor) -> None:
        self.features[:, at] = features
        self.has_features[at] = True

    def forget_features(self, start: int) -> None:
        """The device rewound to `start`: the features of its drafts from there on belong to a discarded stream."""
        self.has_features[start:] = False

    @torch.inference_mode()
    def verify(self, start: int, unseen: Tensor, drafts: Tensor, q: Tensor, generator: torch.Generator,
               local: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """`unseen` (B, u): the tokens at positions start.. that the cloud has not ingested (accepted on the device
        since the last sync, or sampled by the cloud last time); `drafts` (B, k) follow them, drawn from q
        (B, k, V). One forward; returns (n_accepted, next_token) from the acceptance policy. Rows marked `local`
        (B,) kept their drafts on the device: they count as fully accepted.

        Returns None, touching nothing, for a stale request: one the device built on a stream that an earlier
        verdict has already contradicted (sent while that verdict was on its way), i.e. one that does not start
        where the cloud stands or does not carry the token the cloud chose there."""
        if start != self.n_ingested or (self.chosen is not None and (
                unseen.shape[1] == 0 or bool((unseen[:, 0] != self.chosen).any()))):
            return None
        at, k = self.n_ingested, drafts.shape[1]
        seq = torch.cat([unseen, drafts], dim=1)
        logits = self._forward(seq, at)
        preds = torch.cat([self.next_logits[:, None], logits], dim=1)  # predicts tokens at .. at+len(seq)
        u = unseen.shape[1]
        p = self._probs(preds[:, u:u + k + 1])  # (B, k+1, V): drafts and the bonus
        n, nxt = self.policy(p, q, drafts, generator)
        if local is not None:
            n = torch.where(local, torch.full_like(n, k), n)
        # every row keeps the same number of drafts (lockstep): the smallest; for rows that accepted more, the
        # draft at that position is itself an exact sample and replaces the correction
        n_min = int(n.min())
        if n_min < k:
            nxt = torch.where(n > n_min, drafts[:, n_min], nxt)
        self.n_ingested = at + u + n_min
        self.next_logits = preds[:, u + n_min]
        self.chosen = nxt
        return torch.full_like(n, n_min), nxt
