"""Warm DeepSpeed's op cache: the first `init_distributed` JIT-builds `deepspeed_shm_comm`.

Run once per machine (`make warm`) so tests and the demo do not pay ~75 s on first use.
"""
import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        os.environ.setdefault(key, value)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo" if not __import__("torch").cuda.is_available() else "nccl")
    dist.barrier()
    dist.destroy_process_group()
    print("deepspeed op cache warm:", os.environ.get("TORCH_EXTENSIONS_DIR", "(default)"))


if __name__ == "__main__":
    main()
