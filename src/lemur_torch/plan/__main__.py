import sys

from lemur_torch.plan.cli import main

sys.exit(main())
