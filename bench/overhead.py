"""Engine and method overhead, side by side in one run: ``python bench/overhead.py --quick`` (see
``tokbench.overhead``; ``tokbench bench`` is the same measurement)."""

from tokbench.overhead import main

if __name__ == "__main__":
    main()
