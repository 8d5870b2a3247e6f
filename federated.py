"""Federated averaging (DESIGN E4).

  phi <- sum_k (n_k / sum_j n_j) * phi_k          over the clients that reported this round  (E4)

Used twice in MoR: for the router's parameters each round (E4), and once for the FedAvg-RM
baseline (E8, homogeneous setting only: one reward model whose parameters are the sample-weighted
average of the client RMs, i.e. the parameter-sharing method MoR is compared against).

What may cross the boundary between a client and the server is deliberately narrow: state dicts
of tensors (safetensors on disk), reward-model directories, and counts n_k; `fedavg` takes exactly
the state dicts and counts. (The client objects and the round loop come with the router stage.)
"""

from __future__ import annotations

import torch


def fedavg(state_dicts: list[dict[str, torch.Tensor]], num_examples: list[int]) -> dict[str, torch.Tensor]:
    """E4: the n_k-weighted mean of `state_dicts`, key by key.

    Refuses (ValueError, naming the client index and key) mismatched key sets, shapes, non-float
    tensors that differ, non-positive counts, and an empty round. Floating tensors are averaged in
    float64 and cast back to their dtype, so the result does not depend on the clients' order
    beyond float64 rounding; integer buffers (e.g. counters) must agree and are copied.
    """
    if not state_dicts:
        raise ValueError("fedavg: no client reported this round (nothing to average)")
    if len(state_dicts) != len(num_examples):
        raise ValueError(f"fedavg: {len(state_dicts)} state dicts but {len(num_examples)} example counts")
    if any(n <= 0 for n in num_examples):
        raise ValueError(f"fedavg: example counts must be positive, got {list(num_examples)}")
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(ref):
            missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
            raise ValueError(f"fedavg: client {i} keys differ from client 0 (missing {missing}, unexpected {extra})")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise ValueError(f"fedavg: client {i} '{k}' has shape {tuple(v.shape)}, "
                                 f"client 0 has {tuple(ref[k].shape)}")
    total = float(sum(num_examples))
    weights = [n / total for n in num_examples]  # n_k / sum_j n_j
    out = {}
    for k, v0 in ref.items():
        if not v0.is_floating_point():
            for i, sd in enumerate(state_dicts[1:], 1):
                if not torch.equal(sd[k], v0):
                    raise ValueError(f"fedavg: integer tensor '{k}' differs between client 0 and client {i}")
            out[k] = v0.clone()
            continue
        acc = torch.zeros(v0.shape, dtype=torch.float64)
        for w, sd in zip(weights, state_dicts):
            acc += w * sd[k].detach().to("cpu", torch.float64)
        out[k] = acc.to(v0.dtype)
    return out
