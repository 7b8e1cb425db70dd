import sys

from akod_ray.cli import main

sys.exit(main())
