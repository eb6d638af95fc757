"""Our skill validator against skills-ref, the Agent Skills standard's reference library (PyPI).

Both judge the same set of good and bad skill folders; each must accept the good ones and
reject the bad ones. Skipped only when skills-ref is not installed (the dev extra has it).
"""

import os
import pathlib
import tempfile
import unittest

import skills
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

try:
    import skills_ref
except ImportError:  # pragma: no cover - the dev extra installs it
    skills_ref = None

GOOD = {
    "pdf": "---\nname: pdf\ndescription: Fill PDF forms.\n---\nbody\n",
    "git-log-2": "---\nname: git-log-2\ndescription: Read history.\nlicense: MIT\n"
                 "compatibility: needs git\nmetadata:\n  author: x\n---\n",
    "a" * 64: f"---\nname: {'a' * 64}\ndescription: Long name.\n---\n",
}
BAD = {
    "Upper": "---\nname: Upper\ndescription: d\n---\n",
    "-lead": "---\nname: -lead\ndescription: d\n---\n",
    "trail-": "---\nname: trail-\ndescription: d\n---\n",
    "dou--ble": "---\nname: dou--ble\ndescription: d\n---\n",
    "b" * 65: f"---\nname: {'b' * 65}\ndescription: d\n---\n",
    "folder": "---\nname: other\ndescription: d\n---\n",
    "no-name": "---\ndescription: d\n---\n",
    "no-desc": "---\nname: no-desc\n---\n",
    "long-desc": "---\nname: long-desc\ndescription: " + "d" * 1025 + "\n---\n",
    "no-front": "just text\n",
    "unclosed": "---\nname: unclosed\ndescription: d\n",
}


@unittest.skipIf(skills_ref is None, "skills-ref is not installed (pip install -e '.[dev]')")
class AgainstReference(unittest.TestCase):
    def test_same_verdicts(self):
        with tempfile.TemporaryDirectory() as t:
            for expected, cases in (("good", GOOD), ("bad", BAD)):
                for folder, text in cases.items():
                    d = os.path.join(t, folder)
                    os.makedirs(d)
                    with open(os.path.join(d, "SKILL.md"), "w") as f:
                        f.write(text)
                    ours = "bad" if skills.check(d).problems else "good"
                    theirs = "bad" if skills_ref.validate(pathlib.Path(d)) else "good"
                    with self.subTest(folder=folder):
                        self.assertEqual((ours, theirs), (expected, expected))


if __name__ == "__main__":
    unittest.main()
