import os

import torch


# Tests run on 2 cores with 2 xdist workers: one intra-op thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("DLAB_TEST_THREADS", "1")))
