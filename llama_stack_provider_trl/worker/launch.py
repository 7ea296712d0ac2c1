"""torchrun for a job of several processes: `python -m llama_stack_provider_trl.worker.launch TORCHRUN-ARGS`.

torch.distributed.run does the launching (rendezvous, one process per rank, stopping the others when one
fails); this only makes its process die with the server first, as every worker process does.
"""

import sys

from torch.distributed.run import main as torchrun

from .main import die_with_parent

if __name__ == "__main__":
    die_with_parent()
    sys.exit(torchrun(sys.argv[1:]))
