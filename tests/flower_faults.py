"""A ClientApp that misbehaves on purpose: flower_app's handlers plus faults, for tests/test_flower.py.

The product's ClientApp knows no faults. This one reuses its three handlers and wraps the training
step with the faults that a SuperNode's node config schedules under the key `fault`: a comma list of
KIND@ROUND (ROUND omitted or "*" = every round). It reaches the SuperNodes the way the product's
reaches them, inside the Flower App: flower_fed.launch(..., client_app="flower_faults:app",
extra_modules=[this file], node_config={"c1": {"fault": "sleep@1"}}). The fast tests call `app`
directly with such a node config.

  sleep: hang for an hour before training        exit: the ClientApp process dies, no reply
  raise: the ClientApp raises                    bad-keys / bad-shape / nan: a corrupted upload
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from federation import flower_app

FAULTS = ("sleep", "exit", "raise", "bad-keys", "bad-shape", "nan")


def scheduled(context: Context, rnd: int) -> set[str]:
    """The fault kinds this node's config schedules for round `rnd`."""
    out = set()
    for item in (s.strip() for s in str(context.node_config.get("fault", "")).split(",")):
        if not item:
            continue
        kind, _, when = item.partition("@")
        if kind not in FAULTS:
            raise ValueError(f"node-config fault {item!r}: unknown kind (one of {FAULTS})")
        if when not in ("", "*") and not when.isdigit():
            raise ValueError(f"node-config fault {item!r}: ROUND must be a round number or *")
        if when in ("", "*") or int(when) == rnd:
            out.add(kind)
    return out


def corrupt(state: dict[str, torch.Tensor], faults: set[str]) -> dict[str, torch.Tensor]:
    """Damage an upload the way a buggy or hostile client would."""
    state = dict(state)
    key = next(k for k, v in state.items() if v.dim() >= 1 and v.shape[-1] > 1)
    if "bad-keys" in faults:
        state[key + "_typo"] = state.pop(key)  # a renamed parameter: missing one key, one unexpected
    elif "bad-shape" in faults:
        state[key] = state[key][..., :-1].clone()  # one column short
    elif "nan" in faults:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    return state


def train(msg: Message, context: Context) -> Message:
    """flower_app.client_train, with this round's faults before it (sleep, exit, raise) or applied
    to its upload (bad-keys, bad-shape, nan)."""
    faults = scheduled(context, int(msg.content["config"]["round"]))
    if "sleep" in faults:
        time.sleep(3600)
    if "exit" in faults:
        os._exit(3)  # the process vanishes without a reply, like a crashed site
    if "raise" in faults:
        raise RuntimeError("injected failure (node-config fault)")
    reply = flower_app.client_train(msg, context)
    if faults:
        state = reply.content["router"].to_torch_state_dict()
        reply.content["router"] = ArrayRecord(torch_state_dict=corrupt(state, faults))
    return reply


app = ClientApp()
app.query()(flower_app.client_handshake)
app.train()(train)
app.evaluate()(flower_app.client_evaluate)
