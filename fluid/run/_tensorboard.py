"""TensorBoard scalars without TensorFlow: event files written by hand.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, payload,
masked CRC-32C of the payload) whose payloads are `Event` protocol buffers; scalars are
`Summary.Value.simple_value`. The few protobuf fields needed are encoded here directly.
"""

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecords."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


# `SessionLog.status = START`, the `session_log` field (7) of an `Event`.
_SESSION_START = _field(1, 0, _varint(1))


def _event(step: int, wall_time: float, *, summary: bytes = b"", version: str = "",
           session_log: bytes = b"") -> bytes:
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if version:
        out += _bytes_field(3, version.encode())
    if summary:
        out += _bytes_field(5, summary)
    if session_log:
        out += _bytes_field(7, session_log)
    return out


def _scalar_summary(values: dict[str, float]) -> bytes:
    out = b""
    for tag, value in values.items():
        one = _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))
        out += _bytes_field(1, one)
    return out


class SummaryWriter:
    """Appends scalars to a new TensorBoard event file in `log_dir`.

    **Arguments:**

    - `log_dir`: the folder TensorBoard is pointed at (`tensorboard --logdir <log_dir>`).
    """

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{id(self)}"
        self.path = self.log_dir / name
        self._file = open(self.path, "ab")
        self._write(_event(0, time.time(), version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        length = struct.pack("<Q", len(payload))
        self._file.write(length + struct.pack("<I", _masked(crc32c(length))))
        self._file.write(payload + struct.pack("<I", _masked(crc32c(payload))))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record `values` (tag to number) at `step`."""
        self._write(_event(step, time.time(), summary=_scalar_summary(values)))

    def restart_at(self, step: int) -> None:
        """Mark a resumed run: TensorBoard drops the events at `step` and after that earlier
        event files hold (a killed run logged steps past its last checkpoint, which are
        trained again), as for a `SessionLog.START` written by TensorFlow's own writers."""
        self._write(_event(step, time.time(), session_log=_SESSION_START))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
