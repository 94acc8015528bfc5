"""Read back what the trackers wrote: TensorBoard event files and W&B run files."""

from __future__ import annotations

import glob
import os
import struct


def tensorboard_events(logdir) -> list[tuple[int, str, float | str]]:
    """(step, tag, value) of every summary in the TFRecord event files under `logdir` (parsed with
    tensorboardX's protos); a text summary's value is its string."""
    from tensorboardX.proto import event_pb2

    out: list[tuple[int, str, float | str]] = []
    for path in sorted(glob.glob(os.path.join(os.fspath(logdir), "events.out.tfevents.*"))):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("tensor") and v.tensor.string_val:
                    out.append((event.step, v.tag, v.tensor.string_val[0].decode()))
                else:
                    out.append((event.step, v.tag, v.simple_value))
    return out


def wandb_records(run_dir: str) -> list:
    """The protobuf records of a W&B run file (`run-<id>.wandb`): after the file's 7-byte header,
    LevelDB log blocks of 32 KiB, each record a 7-byte header (crc32c, length, type: 1 full,
    2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data, pos, block, chunk, out = open(path, "rb").read(), 7, 32768, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(pb.Record.FromString(chunk))
            chunk = b""
    return out


def wandb_history(run_dir: str) -> list[dict]:
    """The history rows (`run.log` calls) of a W&B run file, values decoded from JSON."""
    import json

    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]  # fmt: skip
