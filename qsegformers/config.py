"""Every qsegformers config key, with its default and a one-line meaning.

``add_qsegformers_config(cfg)`` extends detectron2's ``get_cfg()`` so that official Mask2Former YAML
files (which also use keys of detectron2's DeepLab project) merge unchanged.
"""
from detectron2.config import CfgNode as CN

from .backbones.swin_config import COMPAT_UNSET, add_swin_config
from .backbones.vit_config import add_vit_config
from .decoders.mp_config import add_mp_config
from .decoders.pft_config import add_pft_config
from .decoders.faseg_config import add_faseg_config
from .decoders.segvit_config import add_segvit_config
from .data.datasets.custom_config import add_custom_dataset_config
from .pixel_decoders.msdeform import OFFICIAL_UNREAD_ENCODER_KEYS as UNREAD_ENCODER_KEYS

__all__ = ["add_qsegformers_config", "add_deeplab_compat_config", "check_unsupported_keys"]

# DeepLab head keys (official Mask2Former configs inherit them from add_deeplab_config), declared only so that
# official files merge: qsegformers builds no DeepLab head, so only these values are accepted.
_DEEPLAB_HEAD_VALUES = {
    "MODEL.SEM_SEG_HEAD.LOSS_TYPE": "hard_pixel_mining",  # loss of DeepLab's semantic head
    "MODEL.SEM_SEG_HEAD.PROJECT_FEATURES": ["res2"],  # features DeepLab v3+ projects into its decoder
    "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS": [48],  # channels of those projections
    "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 256,  # ASPP width
    "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS": [6, 12, 18],  # ASPP dilation rates
    "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.1,  # ASPP dropout
    "MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV": False,  # depthwise-separable ASPP convolutions
}
# Official keys of other projects with no qsegformers meaning, declared (by add_qsegformers_config, in their
# own sections) only so that official files merge; only these values are accepted.
_OFFICIAL_ONLY_VALUES = {
    "MODEL.MASK_FORMER.ENC_LAYERS": 0,  # MaskFormer (v1)'s transformer encoder layers
    "GLOBAL.HACK": 1.0,  # Mask2Former's placeholder used by its LSJ hack
    # Official MP-Former fork keys without a qsegformers implementation.
    "MODEL.MASK_FORMER.DN_MODE": "base",  # fork's denoising mode
    "MODEL.MASK_FORMER.DN_RATIO": 0.5,  # fork's denoising ratio
    "MODEL.MASK_FORMER.LAST_Q_RATIO": 0.0,  # fork's ratio of last-layer queries
    "SOLVER.DROP_EP": 0,  # fork's epoch at which MP training is dropped
    "SOLVER.INSTANT_DROP": False,  # fork's immediate drop of MP training
}
# Keys accepted only at one value (check_unsupported_keys), each declared once from these dicts.
_FIXED_VALUES = {**_DEEPLAB_HEAD_VALUES, **_OFFICIAL_ONLY_VALUES}
# DeepLab ResNet keys: honoured by build_resnet_deeplab_backbone (backbones/resnet_deeplab.py), silently
# ignored by detectron2's ResNet builders, which therefore accept only these defaults.
_DEEPLAB_RESNET_DEFAULTS = {
    "MODEL.RESNETS.RES4_DILATION": 1,  # dilation of res4 (res5 is set by detectron2's RES5_DILATION)
    "MODEL.RESNETS.RES5_MULTI_GRID": [1, 1, 1],  # per-block dilation multipliers of res5
    "MODEL.RESNETS.STEM_TYPE": "basic",  # "basic" (7x7) or "deeplab" (three 3x3) stem
}
_BACKBONES_IGNORING_DEEPLAB_KEYS = ("build_resnet_backbone",)
# MODEL.* namespaces that only add_qsegformers_config declares together: all present = already added.
_QSEG_NAMESPACES = ("MASK_FORMER", "MP", "DN", "PFT", "DFPQ", "HRCA", "ATM", "SHRUNK")


def _declare(cfg, values):
    """Set every dotted key of ``values`` on ``cfg`` (its parent nodes must exist)."""
    for key, value in values.items():
        *parents, name = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[name] = list(value) if isinstance(value, list) else value


def _value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


def check_unsupported_keys(cfg):
    """Raise one ValueError listing every compatibility key set to a value qsegformers cannot honour."""
    messages = []
    problems = [
        f"{key} = {_value(cfg, key)!r} (only {supported!r} is supported)"
        for key, supported in _FIXED_VALUES.items()
        if _value(cfg, key) != supported
    ]
    if problems:
        messages.append(
            "These keys are accepted only so that official Mask2Former/DeepLab configs merge; qsegformers "
            "does not build what they configure: " + "; ".join(problems) + ". Remove them from the config."
        )
    backbone = cfg.MODEL.BACKBONE.NAME
    ignored = [
        f"{key} = {_value(cfg, key)!r}"
        for key, default in _DEEPLAB_RESNET_DEFAULTS.items()
        if backbone in _BACKBONES_IGNORING_DEEPLAB_KEYS and _value(cfg, key) != default
    ]
    if ignored:
        messages.append(
            f"MODEL.BACKBONE.NAME = {backbone!r} ignores " + "; ".join(ignored) + ": set MODEL.BACKBONE.NAME to "
            "'build_resnet_deeplab_backbone' (the DeepLab ResNet: deeplab stem, res4 dilation, res5 multi-grid) "
            "or remove these keys."
        )
    if messages:
        raise ValueError(" ".join(messages))


def add_deeplab_compat_config(cfg):
    """Keys of detectron2's DeepLab project that official Mask2Former configs set."""
    # Solver: poly learning-rate schedule.
    cfg.SOLVER.POLY_LR_POWER = 0.9  # exponent of (1 - iter / max_iter)
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0  # LR factor below which the schedule stays constant
    # Semantic crop that caps the area a single category may cover (Mask2Former semantic mapper).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # DeepLab's semantic/ASPP head (fixed values, see check_unsupported_keys) and ResNet extensions.
    _declare(cfg, _DEEPLAB_HEAD_VALUES)
    _declare(cfg, _DEEPLAB_RESNET_DEFAULTS)


def add_qsegformers_config(cfg):
    """Add every qsegformers key (Mask2Former names first) to ``cfg`` in place. Idempotent: on a config that
    already has them it changes nothing (re-declaring ``MODEL.MASK_FORMER`` would reset values merged in
    between)."""
    if all(hasattr(cfg.MODEL, ns) for ns in _QSEG_NAMESPACES) and hasattr(cfg, "GLOBAL"):
        return
    add_deeplab_compat_config(cfg)

    # ---- data ----
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"  # name in the mapper registry
    cfg.INPUT.COLOR_AUG_SSD = False  # photometric distortion of SSD during training
    cfg.INPUT.SIZE_DIVISIBILITY = -1  # pad training crops to a multiple of this (-1: no padding)
    # Large-scale jitter (LSJ) for COCO: random scale of IMAGE_SIZE in [MIN_SCALE, MAX_SCALE].
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # ---- test-time augmentation (detectron2's TEST.AUG.{ENABLED,MIN_SIZES,MAX_SIZE,FLIP}) ----
    cfg.TEST.AUG.MASK_NMS_THRESH = 0.5  # instances of one class overlapping more (mask IoU) are merged
    # Sliding-window semantic inference (any semantic model; MaskFormer.inference, sliding_window.py).
    cfg.TEST.SLIDING_WINDOW = False  # predict on overlapping crops and average their class scores
    cfg.TEST.SLIDE_CROP = 512  # window side in pixels (the training crop)
    cfg.TEST.SLIDE_STRIDE = 341  # step between windows in pixels

    # ---- solver ----
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # weight decay of nn.Embedding parameters (queries)
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # LR multiplier of backbone parameters
    cfg.MODEL.ALLOW_PICKLE_WEIGHTS = False  # load .pkl/.pth weights with full pickle (can run code)

    # ---- model: Mask2Former meta-architecture and transformer decoder ----
    cfg.MODEL.MASK_FORMER = CN()
    mf = cfg.MODEL.MASK_FORMER
    mf.DEEP_SUPERVISION = True  # losses on every decoder layer's prediction
    mf.NO_OBJECT_WEIGHT = 0.1  # class weight of the "no object" class in the CE loss
    mf.CLASS_WEIGHT = 1.0  # weight of the classification loss (and matching cost)
    mf.DICE_WEIGHT = 1.0  # weight of the dice loss (and matching cost)
    mf.MASK_WEIGHT = 20.0  # weight of the sigmoid BCE mask loss (and matching cost)
    mf.NHEADS = 8  # attention heads of the transformer decoder and of the pixel decoder's deformable encoder
    mf.DROPOUT = 0.1  # dropout of the pixel decoder's deformable encoder (the official decoder uses none)
    mf.DIM_FEEDFORWARD = 2048  # FFN hidden size of the transformer decoder
    mf.DEC_LAYERS = 6  # decoder layers, counting the prediction on the learnable queries
    mf.PRE_NORM = False  # pre-norm transformer layers
    mf.HIDDEN_DIM = 256  # query and feature width of the transformer decoder
    mf.NUM_OBJECT_QUERIES = 100  # number of learnable queries
    mf.TRANSFORMER_IN_FEATURE = "res5"  # which pixel-decoder output feeds the decoder
    mf.ENFORCE_INPUT_PROJ = False  # always project decoder inputs, even when widths match
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"  # decoder registry name
    mf.SIZE_DIVISIBILITY = 32  # images are padded to a multiple of this in the meta-architecture
    # Point-sampled losses (PointRend-style importance sampling).
    mf.TRAIN_NUM_POINTS = 112 * 112  # points per mask for the matching costs and mask losses
    mf.OVERSAMPLE_RATIO = 3.0  # oversampling before picking the most uncertain points
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75  # fraction of points chosen by uncertainty
    mf.MATCHER_NAME = ""  # matcher registry name; "" uses the one the decoder declares
    mf.CRITERION_NAME = ""  # criterion registry name; "" uses the one the decoder declares
    # Official MP-Former fork keys mapped onto MODEL.MP.* by decoders/mp_config.py's mp_options
    # (None / -1 = not set: the MODEL.MP key wins).
    mf.ALL_LY_DN = None  # True -> MP.LAYERS = -1, False -> first 4 layers
    mf.DN_NO_LB = None  # True drops the MP classification loss (MP.CLS_LOSS = False)
    mf.HEAD_DN = None  # per-head noise (MP.PER_HEAD_NOISE)
    mf.LB_NOISE_RATIO = -1.0  # label-noise ratio; < 0 keeps MP.LABEL_NOISE_RATIO
    # Official SeMask-Mask2Former prior-loss weight; unset (-1) defers to MODEL.SEMASK.PRIOR_LOSS_WEIGHT
    # (see losses/semask_prior.py and backbones/swin_config.py's resolve_compat_key).
    mf.CATE_WEIGHT = float(COMPAT_UNSET)
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True  # produce "sem_seg" at inference
    mf.TEST.INSTANCE_ON = False  # produce "instances" at inference
    mf.TEST.PANOPTIC_ON = False  # produce "panoptic_seg" at inference
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.0  # min class score of a kept query (panoptic)
    mf.TEST.OVERLAP_THRESHOLD = 0.0  # min visible fraction of a query's mask (panoptic)
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False  # resize masks before combining

    # ---- model: head and pixel decoder ----
    ssh = cfg.MODEL.SEM_SEG_HEAD
    ssh.MASK_DIM = 256  # width of the per-pixel embeddings (mask features)
    ssh.TRANSFORMER_ENC_LAYERS = 0  # deformable-attention encoder layers of the pixel decoder
    ssh.PIXEL_DECODER_NAME = "BasePixelDecoder"  # pixel decoder registry name
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]  # encoder inputs
    # Official keys the original declares but never reads (its encoder has MODEL.MASK_FORMER.NHEADS heads and
    # 4 points); accepted only at these official defaults, so that official config dumps merge.
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = UNREAD_ENCODER_KEYS["DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS"]
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = UNREAD_ENCODER_KEYS["DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS"]
    ssh.DEFORMABLE_ATTN_IMPL = "auto"  # deformable attention op: "auto", "compiled" or "pytorch"

    # ---- backbones: each backbone module declares its own keys ----
    add_swin_config(cfg)
    add_vit_config(cfg)
    add_pft_config(cfg)  # MODEL.PFT.* (Pyramid Fusion Transformer)
    add_mp_config(cfg)  # MODEL.MP.* and the official MP-Former fork's MODEL.DN.*
    add_faseg_config(cfg)  # MODEL.DFPQ.* and MODEL.HRCA.* (FASeg)
    add_segvit_config(cfg)  # MODEL.ATM.*, MODEL.SHRUNK.* (SegViT)

    # Mask2Former's `add_maskformer2_config` also declares GLOBAL (GLOBAL.HACK, used by its LSJ hack).
    cfg.GLOBAL = CN()
    _declare(cfg, _OFFICIAL_ONLY_VALUES)  # fixed-value official keys (ENC_LAYERS, GLOBAL.HACK, MP fork's)
    add_custom_dataset_config(cfg)  # DATASETS.CUSTOM.*: a dataset on disk registered from the config
