"""The layouts a job can shrink to: python -m elastic.plan N -- [train.py flags] prints one JSON
line {"sizes": {n: dp}, "out_dir": ..., "layout": {...}} or, for bad flags, train.py's one-line
error and exit 2 (the flags checked by train_config.py). Run by the supervisor as its own
process, since importing train_config (through collectives) starts MPI.

The rule (parallel/config.py shrunk_sizes): keep pp, sp and tp (the model's shape sets them)
and shrink dp; at n ranks the layout is the largest dp <= n / (pp sp tp) that the batch and the
model allow, using dp pp sp tp ranks and leaving the rest idle.
"""
import json
import sys

import train_config
from engine.config import ConfigError
from parallel.config import shrunk_sizes


def main(argv):
    n, args = int(argv[0]), argv[2:] if argv[1:2] == ["--"] else argv[1:]
    try:
        model, par, cfg = train_config.parse_configs(args)
        world = par.dp * par.pp * par.sp * par.tp
        if world != n:
            raise ConfigError(f"the layout dp {par.dp} x pp {par.pp} x sp {par.sp} x tp {par.tp} needs {world} ranks, "
                              f"not -n {n}")
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(json.dumps({"sizes": shrunk_sizes(par, model, cfg.batch_size, n), "out_dir": cfg.out_dir,
                      "max_steps": cfg.max_steps, "layout": {"dp": par.dp, "pp": par.pp, "sp": par.sp, "tp": par.tp}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
