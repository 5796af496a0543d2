"""Reading what an offline W&B run wrote, for tests of the W&B logger and sweeps."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def read_run(run_dir: Path) -> dict:
    """Group, name, job type, final config and exit code of an offline run."""
    (log_file,) = run_dir.glob("run-*.wandb")
    run: dict = {"config": {}}
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {
                "group": record.run.run_group,
                "name": record.run.display_name,
                "job_type": record.run.job_type,
            }
        elif kind == "config":
            run["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Records of a ``run-*.wandb`` file.

    wandb 0.31 keeps its reader in the Go core, so the LevelDB-log framing it writes is read
    here: a 7-byte file header, then 32 KiB blocks of records, each a 7-byte header
    (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) and its protobuf payload.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    position, payload = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # block trailer too short for a header: padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record
