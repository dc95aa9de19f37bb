"""This process's place among the replicas, and what they exchange: no-ops in one process.

The launcher (trainer/launch.py) has set up torch.distributed where there are several replicas;
the loop sees only `rank`, `world` and `master` and the collectives below.
"""
import torch
import torch.distributed as dist


class Ranks:
    def __init__(self, device: torch.device):
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.master = self.rank == 0
        self.device = device  # NCCL exchanges tensors on it
        # the stop vote travels on CPU tensors, over gloo whatever the main backend
        self.cpu_group = dist.new_group(backend="gloo") if self.world > 1 else None
        self.pending = None  # the vote started after the previous step: (work, flag)

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world if self.master else None
        dist.gather_object(obj, objs, dst=0)
        return objs

    def all_ranks(self, values) -> torch.Tensor:
        """Every rank's numbers in one exchange: a [world, len(values)] float64 tensor on the CPU, row r rank r's."""
        mine = torch.tensor([values], dtype=torch.float64, device=self.device)
        if self.world == 1:
            return mine.cpu()
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(rows, mine)
        return torch.cat(rows).cpu()

    def vote_to_stop(self, asked: bool) -> bool:
        """Called by every rank after every step: -> whether all ranks stop now, because any of them was asked.
        Several ranks: the vote runs beside the next step (an async all-reduce of one int on the CPU, no
        wait on the device), so a request is acted on one step later, at the same step on every rank."""
        if self.world == 1:
            return asked
        flag = torch.tensor([int(asked)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group, async_op=True)
        previous, self.pending = self.pending, (work, flag)
        return self._result(previous)

    def any(self, asked: bool) -> bool:
        """Whether any rank was asked (one blocking vote, where the ranks stand at the same point)."""
        if self.world == 1:
            return asked
        self.end_vote()  # a vote still running is every rank's alike: let it finish first
        self.vote_to_stop(asked)
        return self.end_vote()

    def end_vote(self) -> bool:
        """The vote still running after an epoch's last step: -> whether any rank was asked then."""
        previous, self.pending = self.pending, None
        return self._result(previous)

    @staticmethod
    def _result(vote) -> bool:
        if vote is None:
            return False
        work, flag = vote
        work.wait()
        return bool(flag.item())
