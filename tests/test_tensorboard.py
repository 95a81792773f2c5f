"""TensorBoard event files written without TensorFlow: checksums and record framing."""

import struct

from fluid.run._tensorboard import crc32c
from fluid.train import SummaryWriter


def _masked(crc: int) -> int:
    # TFRecord's masking, from its format description.
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_check_value():
    # The CRC catalogue's check value of CRC-32C (iSCSI) for b"123456789".
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_event_file_records_and_scalars(tmp_path):
    writer = SummaryWriter(tmp_path)
    writer.scalars(3, {"loss": 0.25})
    writer.scalars(4, {"loss": 0.125, "grad_norm": 2.0})
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    data, records = path.read_bytes(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == _masked(crc32c(data[:8]))
        payload = data[12 : 12 + length]
        assert struct.unpack("<I", data[12 + length : 16 + length])[0] == _masked(crc32c(payload))
        records.append(payload)
        data = data[16 + length :]
    assert len(records) == 3  # the version event, then one event per call
    assert b"brain.Event:2" in records[0]
    # Event.step (field 2, varint) and each Summary.Value: tag (field 1) + simple_value
    # (field 2, a little-endian float32).
    assert b"\x10\x03" in records[1] and b"\x10\x04" in records[2]
    assert b"\x0a\x04loss\x15" + struct.pack("<f", 0.25) in records[1]
    assert b"\x0a\x04loss\x15" + struct.pack("<f", 0.125) in records[2]
    assert b"\x0a\x09grad_norm\x15" + struct.pack("<f", 2.0) in records[2]
