"""Big work buffers: 4 KiB pages, reused by `Scratch`, and what the launcher does at exit."""

import gc
import subprocess
import sys

import numpy as np

from beam_downsample.transforms import work


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping of this process that holds `address` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, stop = (int(part, 16) for part in head.split("-"))
                inside = start <= address < stop
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_buffers_are_writable_and_never_huge_pages():
    buffer = work.small_page_buffer(64 << 20)
    assert buffer.dtype == np.uint8 and buffer.nbytes >= 64 << 20 and buffer.flags.writeable
    buffer[::4096] = 7
    assert int(buffer[::4096].sum()) == 7 * len(buffer[::4096])
    assert "nh" in _vm_flags(buffer.ctypes.data)  # MADV_NOHUGEPAGE


def test_small_buffers_come_from_numpy():
    assert work.small_page_buffer(100).nbytes >= 100
    assert work.small_page_buffer(0).nbytes >= 1


def test_scratch_lends_the_same_memory_again_and_grows_when_asked_for_more():
    scratch = work.Scratch()
    with scratch.borrow("tile", (1, 256, 256, 32), np.uint32) as first:
        assert first.flags.f_contiguous and first.shape == (1, 256, 256, 32)
        address = first.ctypes.data
    del first  # (a borrower that still holds the array keeps its memory from the next one)
    with scratch.borrow("tile", (1, 128, 256, 32), np.uint8) as again:
        assert again.ctypes.data == address
    with scratch.borrow("tile", (1, 512, 512, 32), np.uint32) as larger:
        assert larger.shape == (1, 512, 512, 32)
        larger[...] = 3  # the whole array is backed by memory
        assert int(larger[0, -1, -1, -1]) == 3


def test_the_launcher_leaves_the_collector_on_after_its_imports():
    code = "import gc; import beam_downsample.launch.cli; print(gc.isenabled())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert gc.isenabled()


def test_scratch_never_lends_memory_that_a_view_still_sees():
    """A write that references a level buffer (keep_reference) may hold a view of it after
    the unit: that memory must not be handed to the next unit."""
    scratch = work.Scratch()
    with scratch.borrow("level0", (1, 64, 64, 32), np.uint8) as first:
        kept = first[:, 1:, :, :]  # what tensorstore may still hold
        address = first.ctypes.data
    del first
    with scratch.borrow("level0", (1, 64, 64, 32), np.uint8) as second:
        assert second.ctypes.data != address
        second_address = second.ctypes.data
    del second, kept
    with scratch.borrow("level0", (1, 64, 64, 32), np.uint8) as third:
        assert third.ctypes.data == second_address


def test_writes_that_keep_a_reference_store_what_the_buffer_held(tmp_path):
    import tensorstore as ts

    from beam_downsample.core.box import Box
    from beam_downsample.store import arrays

    array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path)},
                     "metadata": {"shape": [1, 64, 64, 64], "data_type": "uint16",
                                  "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 32, 32, 32]}}}},
                    create=True).result()
    data = np.asfortranarray(np.arange(64 ** 3, dtype=np.uint16).reshape(1, 64, 64, 64) % 1000)
    expected = data.copy()
    arrays.write_region(array, Box((0, 0, 0), (64, 64, 64)), data, keep_reference=True).result()
    data[...] = 0  # after the commit the buffer is ours again
    np.testing.assert_array_equal(array.read().result(), expected)
