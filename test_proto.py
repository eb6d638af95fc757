"""The committed stigmer_pb2*.py files must be exactly what stigmer.proto generates.

    python -m unittest test_proto -v
"""
import os
import subprocess
import sys
import tempfile
import unittest
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATED = ("stigmer_pb2.py", "stigmer_pb2.pyi", "stigmer_pb2_grpc.py")


class GeneratedCodeTest(unittest.TestCase):
    def test_committed_stubs_match_the_proto(self):
        with tempfile.TemporaryDirectory() as out:
            # The command from stigmer.proto's header, writing into a temporary directory.
            subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out}",
                            f"--pyi_out={out}", f"--grpc_python_out={out}", "stigmer.proto"],
                           cwd=HERE, check=True, capture_output=True)
            for name in GENERATED:
                with self.subTest(file=name):
                    with open(os.path.join(out, name), "rb") as fresh, open(os.path.join(HERE, name), "rb") as committed:
                        self.assertTrue(fresh.read() == committed.read(),
                                        f"{name} differs from what stigmer.proto generates: regenerate it with "
                                        "python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. "
                                        "--grpc_python_out=. stigmer.proto")


if __name__ == "__main__":
    unittest.main()
