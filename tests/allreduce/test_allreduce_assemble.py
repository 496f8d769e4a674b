"""Deferred result assembly: a finished round hands out its result before copying the
averages into it (``next_event(assemble=False)`` then ``assemble()``), and the leader's
AR_FINISH is already among its outputs by then."""

from __future__ import annotations

import numpy as np

from node.allreduce import AllReduceConfig, AllReduceRound, OutgoingChunk, RoundFinished, RoundSend
from node.allreduce.testing import node_ids
from protocol.messages.tensor import ArFinish
from protocol.tensor import CodecSpec, encode_chunk

CFG = AllReduceConfig.test().replace(chunk_elements=4, window_bytes=1 << 20)


def _run(cores: list[AllReduceRound], ids: list[bytes]) -> tuple[dict[int, RoundFinished],
                                                                  dict[int, list[RoundSend]]]:
    finished: dict[int, RoundFinished] = {}
    sent_before: dict[int, list[RoundSend]] = {}
    outputs: dict[int, list[RoundSend]] = {i: [] for i in range(len(cores))}
    for _ in range(200):
        for i, c in enumerate(cores):
            for send in c.messages_to_send():
                outputs[i].append(send)
                j = ids.index(send.dest)
                out = send.message
                if isinstance(out, OutgoingChunk):
                    msg = out.to_message(encode_chunk(out.values, CodecSpec()))
                    cores[j].on_tensor(ids[i], msg, out.values.copy(), now=0.0)
                    c.on_sent(send.dest, out.nbytes, now=0.0)
                else:
                    cores[j].on_message(ids[i], out, now=0.0)
            while (ev := c.next_event(assemble=False)) is not None:
                if isinstance(ev, RoundFinished):
                    finished[i], sent_before[i] = ev, list(outputs[i])
        if len(finished) == len(cores):
            break
    return finished, sent_before


def test_result_is_assembled_on_request_after_the_finish_went_out() -> None:
    ids = node_ids(3)
    tensors = [np.arange(30, dtype=np.float32) * (k + 1) for k in range(3)]
    cores = [AllReduceRound(node_id=ids[k], group=ids, key=b"asm", tensor=tensors[k], now=0.0, config=CFG)
             for k in range(3)]
    finished, sent_before = _run(cores, list(ids))
    assert sorted(finished) == [0, 1, 2]
    leader = next(i for i, c in enumerate(cores) if c.leader == ids[i])
    assert any(isinstance(s.message, ArFinish) for s in sent_before[leader])
    want = np.stack(tensors).astype(np.float64).mean(axis=0).astype(np.float32)
    for i, c in enumerate(cores):
        event = finished[i]
        c.assemble()
        assert np.array_equal(event.result.average, want)
        assert c.result is event.result
        c.assemble()  # idempotent
        assert np.array_equal(event.result.average, want)
