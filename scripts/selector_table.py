"""Every selector alone and with Twilight's top-p, on one table (see twilight_eval.selector_table).

    python scripts/selector_table.py --out benchmarks/results/selectors-smollm2
"""
from twilight_eval.selector_table import main

if __name__ == "__main__":
    raise SystemExit(main())
