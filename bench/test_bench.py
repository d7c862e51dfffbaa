"""Unit tests of the benchmark harness's own logic (no KVM, no QEMU, no builds).

Run: python3 -m unittest bench/test_bench.py
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

# Loaded from its path under its own name: `bench` alone would be this directory (a namespace
# package) when run as `python3 -m unittest bench/test_bench.py` from the repository root.
_spec = importlib.util.spec_from_file_location(
    "hv_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"))
bench = importlib.util.module_from_spec(_spec)
sys.modules["hv_bench"] = bench  # dataclasses look their module up here
_spec.loader.exec_module(bench)


SMAPS = """\
55d0c0a00000-55d0c0a40000 r--p 00000000 fd:01 1234                       /usr/bin/hvctl
Size:                256 kB
KernelPageSize:        4 kB
Rss:                 200 kB
Pss:                 100 kB
Pss_Dirty:             0 kB
Shared_Clean:        200 kB
VmFlags: rd mr mw me sd
7f0000000000-7f0010000000 rw-s 00000000 00:01 42                         /memfd:hv-guest-ram (deleted)
Size:             262144 kB
KernelPageSize:        4 kB
Rss:                1024 kB
Pss:                 512 kB
VmFlags: rd wr sh mr mw me ms sd
7f0010000000-7f0010021000 rw-p 00000000 00:00 0
Size:                132 kB
Rss:                  12 kB
Pss:                  12 kB
VmFlags: rd wr mr mw me ac sd
7f0020000000-7f0030200000 rw-p 00000000 00:00 0
Size:             264192 kB
Rss:                8192 kB
Pss:                8192 kB
VmFlags: rd wr mr mw me ac sd hg
7f0040000000-7f0040001000 rw-s 00000000 00:01 43                         /memfd:hv-guest-ram-not (deleted)
Size:                  4 kB
Rss:                   4 kB
Pss:                   4 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  16 kB
Pss:                  16 kB
"""

ROLLUP = """\
55d0c0a00000-7ffd00021000 ---p 00000000 00:00 0                          [rollup]
Rss:                9448 kB
Pss:                8836 kB
Pss_Dirty:          8220 kB
"""


class MarkerTests(unittest.TestCase):
    def test_marker_within_one_chunk(self):
        s = bench.MarkerScanner([bench.DONE_MARKER])
        self.assertEqual(s.feed(b"hello\nhv-testguest: done\n", 1000), [bench.DONE_MARKER])
        self.assertEqual(s.time_of(bench.DONE_MARKER), 1000)
        self.assertEqual(s.offset_of(bench.DONE_MARKER), len(b"hello\nhv-testguest: done"))

    def test_marker_split_across_chunks(self):
        s = bench.MarkerScanner([bench.DONE_MARKER, bench.MODE_MARKER])
        self.assertEqual(s.feed(b"hv-testg", 10), [])
        self.assertEqual(s.feed(b"uest: mode=hello\nhv-testguest: do", 20), [bench.MODE_MARKER])
        self.assertEqual(s.feed(b"ne\n", 30), [bench.DONE_MARKER])
        self.assertEqual(s.time_of(bench.MODE_MARKER), 20)
        self.assertEqual(s.time_of(bench.DONE_MARKER), 30)
        self.assertEqual(s.first_ns, 10)
        self.assertEqual(s.first_len, 8)
        self.assertEqual(s.last_ns, 30)

    def test_marker_byte_by_byte_recorded_once(self):
        s = bench.MarkerScanner([bench.DONE_MARKER])
        text = b"x" * 100 + bench.DONE_MARKER + b"\n" + bench.DONE_MARKER
        hits = []
        for i, byte in enumerate(text):
            hits += s.feed(bytes([byte]), i)
        self.assertEqual(hits, [bench.DONE_MARKER])
        self.assertEqual(s.time_of(bench.DONE_MARKER), 100 + len(bench.DONE_MARKER) - 1)

    def test_absent_marker_and_empty_chunk(self):
        s = bench.MarkerScanner([bench.DONE_MARKER])
        self.assertEqual(s.feed(b"", 5), [])
        self.assertIsNone(s.first_ns)
        s.feed(b"hv-testguest: don", 6)
        self.assertIsNone(s.time_of(bench.DONE_MARKER))
        self.assertIsNone(s.offset_of(bench.DONE_MARKER))

    def test_throughput_excludes_first_chunk_and_trailer(self):
        s = bench.MarkerScanner([bench.THROUGHPUT_MARKER])
        s.feed(b"a" * 100, 1_000_000_000)
        s.feed(b"b" * 1000, 1_500_000_000)
        s.feed(b"c" * 900 + b"throughput: bytes=2000\n", 2_000_000_000)
        # 1900 bytes after the first chunk, over 1 s.
        self.assertAlmostEqual(bench.throughput_bps(s), 1900.0)

    def test_throughput_missing_marker(self):
        s = bench.MarkerScanner([bench.THROUGHPUT_MARKER])
        s.feed(b"xxxx", 1)
        self.assertIsNone(bench.throughput_bps(s))


class ConsolePauseTests(unittest.TestCase):
    MS = 1_000_000

    def test_stopped_at_a_line_end(self):
        # The source's last line at 10 ms, the destination's first at 17 ms: 7 ms apart, 2 of
        # which the guest would have waited anyway.
        src = [(8 * self.MS, b"tick 4", True), (10 * self.MS, b"tick 5", True)]
        dst = [(1 * self.MS, b"hvctl: waiting for a VM on tcp:127.0.0.1:1", True), (17 * self.MS, b"tick 6", True)]
        self.assertAlmostEqual(bench.console_pause_ms(src, dst), 5.0)

    def test_stopped_inside_a_line(self):
        # "tic" at the source, "k 6" at the destination: consecutive bytes, nothing subtracted.
        src = [(10 * self.MS, b"tick 5", True), (11 * self.MS, b"tic", False)]
        dst = [(15 * self.MS, b"k 6", True)]
        self.assertAlmostEqual(bench.console_pause_ms(src, dst), 4.0)

    def test_vm_messages_are_not_guest_output(self):
        # hvctl's message glued to an unfinished guest line leaves that line unfinished; a
        # message alone is no output at all.
        src = [(10 * self.MS, b"tichvctl: m1 migrated to tcp:127.0.0.1:1; this copy ends", True),
               (30 * self.MS, b"hvctl: bye", True)]
        dst = [(12 * self.MS, b"hvctl: receiving m1 (256 MiB) from the source", True), (14 * self.MS, b"k 6", True)]
        self.assertAlmostEqual(bench.console_pause_ms(src, dst), 4.0)

    def test_nothing_yet(self):
        self.assertIsNone(bench.console_pause_ms([(1, b"tick 1", True)], []))
        self.assertIsNone(bench.console_pause_ms([], [(1, b"tick 1", True)]))
        self.assertEqual(bench.console_pause_ms([(10 * self.MS, b"tick 1", True)], [(11 * self.MS, b"tick 2", True)]), 0.0)

    @unittest.skipUnless(shutil.which("gcc"), "gcc builds bench/tsline.c")
    def test_tsline_stamps_lines_and_unfinished_pieces(self):
        with tempfile.TemporaryDirectory() as tmp:
            tsline = os.path.join(tmp, "tsline")
            subprocess.run(["gcc", "-O2", "-o", tsline, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tsline.c")], check=True)
            out = subprocess.run([tsline], input=b"tick 1\ntick 2\ntic", capture_output=True, check=True).stdout
        pieces = [line.split(b" ", 1) for line in out.splitlines()]
        self.assertEqual([p[1] for p in pieces], [b"tick 1", b"tick 2", b"~tic"])
        self.assertTrue(all(int(p[0]) > 0 for p in pieces))


class TerminationTests(unittest.TestCase):
    def test_sigterm_unwinds_and_cleans_up(self):
        # A child that holds a temporary directory, as main() does, and is sent SIGTERM: the
        # directory must be gone and the exit status say which signal ended it.
        code = (
            "import importlib.util, os, signal, sys, tempfile, time\n"
            f"spec = importlib.util.spec_from_file_location('hv_bench', {os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bench.py')!r})\n"
            "bench = importlib.util.module_from_spec(spec); sys.modules['hv_bench'] = bench; spec.loader.exec_module(bench)\n"
            "bench.end_on_termination()\n"
            "with tempfile.TemporaryDirectory(prefix='hv-bench-test-') as d:\n"
            "    print(d, flush=True)\n"
            "    time.sleep(30)\n"
        )
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        directory = child.stdout.readline().strip()
        self.assertTrue(os.path.isdir(directory), directory)
        child.send_signal(15)
        self.assertEqual(child.wait(10), 143)
        self.assertFalse(os.path.exists(directory), "the temporary directory outlived SIGTERM")


class PioreadTests(unittest.TestCase):
    def test_parse(self):
        out = b"hv-testguest: mode=pioread\npioread: count=100000 cycles=1234567890123\nhv-testguest: done\n"
        self.assertEqual(bench.parse_pioread(out), (100000, 1234567890123))

    def test_parse_str_and_missing(self):
        self.assertEqual(bench.parse_pioread("pioread: count=5 cycles=7"), (5, 7))
        self.assertIsNone(bench.parse_pioread("pioread: count=5\n"))
        self.assertIsNone(bench.parse_pioread(b""))

    def test_parse_kv(self):
        kv = bench.parse_kv("tsc_khz_kvm=2445404\nns_per_exit=5123.4\nnoise\n")
        self.assertEqual(kv, {"tsc_khz_kvm": "2445404", "ns_per_exit": "5123.4"})


class StatsTests(unittest.TestCase):
    def test_summarize_odd_even_and_none(self):
        s = bench.summarize([3, 1, 2])
        self.assertEqual((s.median, s.min, s.max, s.n), (2, 1, 3, 3))
        s = bench.summarize([4, 1, 2, 3, None])
        self.assertEqual((s.median, s.min, s.max, s.n), (2.5, 1, 4, 4))
        self.assertIsNone(bench.summarize([]))
        self.assertIsNone(bench.summarize([None]))

    def test_fmt_num(self):
        self.assertEqual(bench.fmt_num(1234.6), "1235")
        self.assertEqual(bench.fmt_num(12.345), "12.3")
        self.assertEqual(bench.fmt_num(5.4321), "5.43")
        self.assertEqual(bench.fmt_num(0.012345), "0.0123")
        self.assertEqual(bench.fmt_num(0), "0")

    def test_fmt_stats(self):
        self.assertEqual(bench.fmt_stats(bench.Stats(5.0, 4.0, 6.5, 3), "ms"), "5.00 (4.00–6.50) ms")
        self.assertEqual(bench.fmt_stats(bench.Stats(5.0, 5.0, 5.0, 1), "ms"), "5.00 ms")
        self.assertEqual(bench.fmt_stats(None, "ms"), "—")

    def test_ratio(self):
        a, b = bench.Stats(10, 9, 11, 3), bench.Stats(40, 30, 50, 3)
        self.assertAlmostEqual(bench.ratio(a, b), 0.25)
        self.assertIsNone(bench.ratio(a, None))
        self.assertIsNone(bench.ratio(a, bench.Stats(0, 0, 0, 1)))
        self.assertEqual(bench.fmt_ratio(0.25), "0.25×")
        self.assertEqual(bench.fmt_ratio(0.0123), "0.012×")
        self.assertEqual(bench.fmt_ratio(1.5), "1.50×")
        self.assertEqual(bench.fmt_ratio(12.34), "12.3×")
        self.assertEqual(bench.fmt_ratio(250), "250×")
        self.assertEqual(bench.fmt_ratio(None), "—")


class SmapsTests(unittest.TestCase):
    def test_parse_entries(self):
        e = bench.parse_smaps(SMAPS)
        self.assertEqual(len(e), 6)
        self.assertEqual(e[0]["name"], "/usr/bin/hvctl")
        self.assertEqual((e[0]["size_kb"], e[0]["rss_kb"], e[0]["pss_kb"]), (256, 200, 100))
        self.assertEqual(e[2]["name"], "")
        self.assertEqual(e[5]["name"], "[stack]")

    def test_guest_ram_memfd_pss(self):
        e = bench.parse_smaps(SMAPS)
        # Only the exact memfd (with " (deleted)"), not a name that merely starts the same.
        self.assertEqual(bench.pss_of_named(e, bench.HV_GUEST_RAM_NAME), 512)
        self.assertEqual(bench.pss_of_named(e, "/nope"), 0)

    def test_qemu_ram_block_by_size(self):
        e = bench.parse_smaps(SMAPS)
        block = bench.qemu_ram_block(e, 256 << 20)
        self.assertIsNotNone(block)
        self.assertEqual((block["size_kb"], block["pss_kb"]), (264192, 8192))
        self.assertIsNone(bench.qemu_ram_block(e, 1 << 30))

    def test_rollup(self):
        self.assertEqual(bench.parse_rollup_pss(ROLLUP), 8836)
        with self.assertRaises(ValueError):
            bench.parse_rollup_pss("Rss: 4 kB\n")


class TableTests(unittest.TestCase):
    def test_format_table_aligns_columns(self):
        t = bench.format_table(["a", "bb"], [["xxx", "y"], ["z", "wwww"]])
        self.assertEqual(t.splitlines(), [
            "a    bb",
            "---  ----",
            "xxx  y",
            "z    wwww",
        ])

    def test_rows(self):
        hv, q = bench.Stats(5.0, 4.0, 6.0, 3), bench.Stats(50.0, 40.0, 60.0, 3)
        r = bench.Row("case", hv, q, unit="µs", target="hv ≤ 2× bare", met=True, note="hv/bare 1.20×")
        self.assertEqual(r.cells(), ["case", "5.00 (4.00–6.00) µs", "50.0 (40.0–60.0) µs", "0.10×",
                                     "hv ≤ 2× bare", "yes (hv/bare 1.20×)"])
        r = bench.Row("ref", hv, None, unit="µs", target="reference", show_ratio=False)
        self.assertEqual(r.cells()[1:4], ["5.00 (4.00–6.00) µs", "—", "—"])
        self.assertEqual(r.cells()[5], "—")
        r = bench.Row("x", hv, q, met=False)
        self.assertEqual(r.cells()[5], "NO")
        r = bench.Bench.not_yet("ISO boot to GRUB prompt", "≪ QEMU", "no CD-ROM yet")
        self.assertEqual(r.cells(), ["ISO boot to GRUB prompt", "not yet", "", "", "≪ QEMU", "no CD-ROM yet"])

    def test_every_case_is_measured(self):
        # The network (case_net), ISO → GRUB (case_grub) and SCSI (case_scsi) rows were "not yet"
        # once; every case the design brief names is measured now.
        self.assertEqual(bench.Bench.cases_not_yet(), [])
        for case in ("case_net", "case_grub", "case_scsi"):
            self.assertTrue(callable(getattr(bench.Bench, case, None)), case)


class PeekTests(unittest.TestCase):
    def test_peek_leaves_the_shared_offset_alone(self):
        import subprocess
        import tempfile
        with tempfile.TemporaryFile() as f:
            # A child writing at the shared offset while we look, as hvctl does in the density case.
            child = subprocess.Popen([sys.executable, "-c",
                                      "import os,time\nfor i in range(200):\n os.write(1, b'line %03d\\n' % i)\n time.sleep(0.0005)"],
                                     stdout=f)
            while child.poll() is None:
                bench.peek(f)
            child.wait()
            expected = b"".join(b"line %03d\n" % i for i in range(200))
            self.assertEqual(bench.peek(f), expected)
            self.assertEqual(f.tell(), len(expected))


if __name__ == "__main__":
    unittest.main()
