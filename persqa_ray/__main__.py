import sys

from persqa_ray.cli import main

sys.exit(main())
