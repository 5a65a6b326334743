"""Small capability probes for the installed torch."""
import torch


def _gather_takes_int32() -> bool:
    try:
        torch.zeros(1, 2).gather(-1, torch.zeros(1, 1, dtype=torch.int32))
        torch.zeros(1, 2).scatter_(-1, torch.zeros(1, 1, dtype=torch.int32), 1.0)
        return True
    except (RuntimeError, TypeError):
        return False


#: Index dtype for gather/scatter: int32 where torch accepts it (int64 copies of large index tensors cost
#: more than the ops that use them on CPU), int64 on older releases.
INDEX_DTYPE = torch.int32 if _gather_takes_int32() else torch.int64
