"""The command line: option ranges, refused keys, executable scripts, one-line errors."""

import os
import shutil
import unittest

import dpmock

from .support import DPMOCK, HERE, PY, SERVER, Server, chat_body, ctl, run


class CliRangeTest(unittest.TestCase):

    def test_negative_values_name_the_valid_range(self):
        for args, valid in ((["--port", "-1"], "from 0 to 65535"), (["--idle-exit", "-5"], "from 0 to"),
                            (["--journal-size", "-1"], "from 0 to 1000000"), (["--parent-pid", "-3"], "from 0"),
                            (["--port=-1"], "from 0 to 65535")):
            r = run([PY, DPMOCK] + args)
            err = r.stderr.decode()
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(valid, err)
            self.assertIn(repr(args[-1].split("=")[-1]), err)
            self.assertNotIn("needs a value", err)
        r = run([PY, DPMOCK, "--port", "--foreground"])  # an option is still not a value
        self.assertEqual(r.returncode, 2)
        self.assertIn("--port needs a value", r.stderr.decode())

    def test_old_python_gets_one_line_and_exit_2(self):
        # No 3.7 here: run the script as __main__ with sys.version_info patched as 3.7 would have it.
        wrapper = ("import runpy, sys\n"
                   "sys.version_info = (3, 7, 17, 'final', 0)\n"
                   "sys.argv = [%r, '--port', '0']\n"
                   "runpy.run_path(%r, run_name='__main__')\n" % (DPMOCK, DPMOCK))
        r = run([PY, "-c", wrapper])
        self.assertEqual((r.returncode, r.stdout), (2, b""))
        self.assertEqual(r.stderr.decode(), "dpmock needs Python 3.8 or newer (this is 3.7)\n")
        import ast
        import glob
        for path in [DPMOCK] + glob.glob(os.path.join(HERE, "dpmocklib", "*.py")):  # 3.7 compiles them: gets that far
            with open(path, encoding="utf-8") as f:
                ast.parse(f.read(), path, feature_version=(3, 7))

    def test_scripts_are_executable(self):
        for name in ("dpmock.py", "dpmockctl.py"):
            self.assertTrue(os.access(os.path.join(HERE, name), os.X_OK), name)
        r = run(["git", "-C", HERE, "ls-files", "-s", "dpmock.py", "dpmockctl.py"]) if shutil.which("git") else None
        if r is not None and r.returncode == 0 and r.stdout:
            self.assertEqual([line.split()[0] for line in r.stdout.decode().splitlines()], ["100755"] * 2)
        r = run([os.path.join(HERE, "dpmockctl.py"), "--version"])
        self.assertEqual(r.returncode, 0, r.stderr)


class RefuseKeyTest(unittest.TestCase):

    def status_for(self, srv, key):
        return srv.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer " + key})[0]

    def test_default_refuses_only_dummy_key_and_invalid(self):
        for key, status in (("dummy_key", 401), ("invalid-key", 401), ("invalid", 401), ("dummy", 200),
                            ("dummy-key", 200), ("dummy_key2", 200), ("sk-dummy", 200), ("sk-test", 200)):
            self.assertEqual(self.status_for(SERVER, key), status, key)
        st, _, data = SERVER.request("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 8,
                                                              "messages": [{"role": "user", "content": "hi"}]},
                                     {"x-api-key": "dummy", "anthropic-version": "2023-06-01"})
        self.assertEqual(st, 200, data)

    def test_refuse_key_is_repeatable_and_survives_restart(self):
        srv = Server("--refuse-key", "sk-bad", "--refuse-key=placeholder")
        self.addCleanup(srv.stop)
        for _ in range(2):
            for key, status in (("sk-bad-1", 401), ("placeholder", 401), ("dummy_key", 401), ("invalid-x", 401),
                                ("sk-good", 200)):
                self.assertEqual(self.status_for(srv, key), status, key)
            r = ctl("restart", "--url", srv.url)
            self.assertEqual(r.returncode, 0, r.stderr)
        config = dpmock.parse_args(["--refuse-key", "a", "--refuse-key", "b"])
        self.assertEqual(dpmock.parse_args(config.to_argv()).refuse_keys, ("a", "b"))
        for args in (["--refuse-key"], ["--refuse-key="]):
            r = run([PY, DPMOCK] + args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1)
