"""An image larger than the emulated board: one line saying so, not make's last line."""

import pytest

from pfpc.errors import PfpcError
from pfpc.runner import _make


def test_linker_region_overflow_is_one_line(tmp_path):
    (tmp_path / "Makefile").write_text(
        "model_qemu.elf:\n\t@echo \"ld: model_qemu.elf section \\`.text' will not fit in region \\`FLASH'\" >&2\n"
        "\t@echo \"ld: region \\`FLASH' overflowed by 819920 bytes\" >&2\n\t@exit 1\n")
    with pytest.raises(PfpcError, match=r"model_qemu.elf needs 819,920 bytes more flash than the emulated board has") as error:
        _make(str(tmp_path), "model_qemu.elf")
    assert "\n" not in str(error.value)
