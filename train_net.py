#!/usr/bin/env python
"""Train or evaluate a qsegformers model (detectron2 command line).

Examples::

    python train_net.py --config-file configs/<dataset>/<task>/<model>.yaml --num-gpus 8
    python train_net.py --config-file CONFIG --resume                       # continue training
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

Without CUDA, the run goes to the CPU (``MODEL.DEVICE cpu``, AMP off) and ``--num-gpus N`` starts N
CPU processes joined by gloo.

``--resume`` continues exactly where the last checkpoint of ``OUTPUT_DIR`` stopped (weights, optimizer,
LR schedule, iteration, data order and augmentations). Weights are loaded without unpickling code
(``torch.load(weights_only=True)``, numpy-only ``.pkl``); ``MODEL.ALLOW_PICKLE_WEIGHTS True`` opts in
to full pickle for trusted files.
"""
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import qsegformers  # noqa: F401  (registers every model part, dataset and mapper)
from qsegformers.engine import Trainer, launch, setup
from qsegformers.engine.checkpoint import QsegCheckpointer
from qsegformers.engine.defaults import launch_device


def main(args):
    """Train (optionally resuming from ``OUTPUT_DIR``) or, with ``--eval-only``, evaluate."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        QsegCheckpointer.from_config(cfg, model).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=launch_device(args),
    )
