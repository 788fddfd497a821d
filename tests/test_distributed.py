"""training.distributed, the one torchrun set-up every trainer of the project uses (tokenizer, AR generator,
diffusion model, VQA): a plain process stays uninitialised; under torchrun's variables each process joins
the gloo group, knows its rank, and meets the others at barriers."""
import os

import torch
import torch.multiprocessing as mp

from training import distributed


def test_a_plain_process_is_rank_0_of_1_and_initialises_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert distributed.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()  # no-ops without a group
    distributed.cleanup()


def _worker(rank: int, world: int, port: int, out) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    device = distributed.init_distributed("cpu")
    total = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(total)  # the group really joins the processes
    distributed.barrier()
    out[rank] = (str(device), distributed.rank(), distributed.world_size(), distributed.is_main(), float(total))
    distributed.cleanup()
    out[f"{rank}/after_cleanup"] = distributed.is_initialized()


def test_torchrun_variables_make_a_gloo_group_of_two():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, port, out), nprocs=2)
        got = dict(out)
    assert got[0] == ("cpu", 0, 2, True, 3.0) and got[1] == ("cpu", 1, 2, False, 3.0)
    assert not got["0/after_cleanup"] and not got["1/after_cleanup"]
