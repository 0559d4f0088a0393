"""Prepares the FID Inception weights in scorelab's .npz layout (docs/fid.md; the library code is
``inception_weights.py``). Needs no torch: the .pth is read by scorelab's allow-listed unpickler
(``score_sde_import``), which runs nothing from the file.

  python scripts/convert_inception_weights.py --download --output inception_fid.npz
      fetches pytorch-fid's pt_inception-2015-12-05-6726825d.pth, checks its sha256, converts it;
  python scripts/convert_inception_weights.py --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz
      converts a local copy (a torch zip archive or a legacy torch.save file; an .npz of the same
      state dict is accepted too).

Copy the output to ``$SCORELAB_CACHE/inception_fid.npz`` (default ``~/.cache/scorelab/``), where
eval and fid_stats look when ``eval.inception_weights`` is '', or point that field at it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import inception_weights  # noqa: E402  (repository root on the path when run as a script)
from inception_weights import (convert_state_dict, export_state_dict,  # noqa: E402,F401
                               read_state_dict, save_converted)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--input", help="pytorch-fid .pth (read without torch) or an .npz of it")
  source.add_argument("--download", action="store_true",
                      help=f"fetch {inception_weights.FID_WEIGHTS_URL}")
  parser.add_argument("--output", required=True, help="converted .npz (eval.inception_weights)")
  args = parser.parse_args(argv)
  if args.download:
    with tempfile.TemporaryDirectory() as tmp:
      shutil.move(inception_weights.fetch_inception_weights(tmp), args.output)
  else:
    save_converted(convert_state_dict(read_state_dict(args.input), args.input), args.output)
  with inception_weights.np.load(args.output) as data:
    n = sum(data[k].size for k in data.files if k.startswith("params/"))
    print(f"wrote {args.output}: {len(data.files)} arrays, {n:,} parameters")


if __name__ == "__main__":
  main()
