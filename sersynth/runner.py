"""``sersynth run``: the experiment runner, flags -> RunConfig -> sersynth.pipeline.run.

    sersynth run --flagfile=experiments/flags/quickstart.flags
    sersynth run --flagfile=experiments/flags/paper_demos.flags --cache_dir=CACHE --stage=experts,distill,evaluate

(``python -m experiments.run`` is the same command from a checkout.)

Every knob is a flag; flag files in experiments/flags/ hold the reproducible configurations.
Bad values stop the run before any compute with a one-line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from sersynth import compile_cache, dist, distill, models, pipeline, protocol, train
from sersynth import dm as dm_lib
from sersynth import tune as tune_lib
from sersynth.data import prepare

F = flags.FLAGS
_BEFORE = set(F)

# --- run ---------------------------------------------------------------------------------------
flags.DEFINE_string("workdir", None, "run directory (config, metrics, artifacts, report)")
flags.DEFINE_list("stage", ["all"], "stages to run: all, or a list of prepare,experts,distill,evaluate")
flags.DEFINE_integer("seed", 0, "root random seed (experts, distillation, evaluation)")
flags.DEFINE_bool("overwrite", False, "redo a finished run / replace a run made with other flags")
flags.DEFINE_bool("progress", True, "progress bars")
flags.DEFINE_bool("tensorboard", False, "also write the metrics as TensorBoard event files in <workdir>/tensorboard "
                  "(needs tensorboardX)")
# --- data --------------------------------------------------------------------------------------
prepare.define_flags(flags)
flags.DEFINE_string("corpus_dir", "", "corpus folder ('' with --corpus=embedded: <workdir>/corpus, generated); "
                    "several corpora: comma-separated, in --corpus order")
flags.DEFINE_integer("fold", -1, "fold protocols (loso, loso_session): run this fold only (-1: every fold, then aggregate)")
flags.DEFINE_string("cache_dir", "", "feature cache folder ('' -> <workdir>/cache)")
flags.DEFINE_string("experts_dir", "", "expert trajectories folder ('' -> <workdir>/experts); runs that share it "
                    "reuse one set of experts")
flags.DEFINE_integer("embedded_speakers", 30, "embedded corpus: speakers (the paper's DEMoS: 68)")
flags.DEFINE_integer("embedded_utterances", 10, "embedded corpus: utterances per speaker and emotion")
# --- model -------------------------------------------------------------------------------------
flags.DEFINE_enum("model", "convnet", ["convnet", "cnn6", "vgg15", "resnet9"], "network")
flags.DEFINE_integer("width", 128, "convnet: channels")
flags.DEFINE_integer("depth", 3, "convnet: conv layers")
flags.DEFINE_float("width_mult", 1.0, "cnn6/vgg15/resnet9: channel multiplier (tiny models: 0.125)")
flags.DEFINE_integer("kernel_size", 3, "size of the 3x3 convolutions (paper text: 3; its stated CNN-6 size: ~5)")
flags.DEFINE_enum("norm", "instance", ["instance", "layer", "none"], "normalisation layers")
flags.DEFINE_enum("compute_dtype", "auto", list(models.COMPUTE_DTYPES),
                  "activation dtype (parameters and losses stay float32); auto: bfloat16 on GPU/TPU, float32 on CPU "
                  "(as measured; the run records the dtype it used)")
# --- experts -----------------------------------------------------------------------------------
flags.DEFINE_integer("n_experts", 5, "expert trajectories to record (paper: 5)")
flags.DEFINE_enum("expert_optimizer", "sgd", ["sgd", "adam"], "expert optimiser (paper: adam; MTT: sgd)")
flags.DEFINE_float("expert_lr", 0.01, "expert learning rate (paper: 1e-3 with adam)")
flags.DEFINE_float("expert_momentum", 0.0, "expert SGD momentum")
flags.DEFINE_float("expert_weight_decay", 0.0, "expert weight decay")
flags.DEFINE_float("expert_lr_decay", 1.0, "expert lr multiplied by this every --expert_lr_decay_every epochs (paper: 0.7)")
flags.DEFINE_integer("expert_lr_decay_every", 0, "epochs between lr decays (paper: 5; 0: constant)")
flags.DEFINE_integer("expert_train_epochs", 50, "epochs per expert (paper: 50)")
flags.DEFINE_integer("expert_batch_size", 256, "expert minibatch")
flags.DEFINE_integer("expert_min_steps_per_epoch", 0, "an expert epoch is at least this many minibatch steps (several "
                     "passes over a small training set; also the full-data reference's epochs); 0: one pass")
flags.DEFINE_float("expert_sam_rho", 0.0, "sharpness-aware minimisation radius for the experts (and the full-data "
                   "reference): FTD's flatter trajectories; each step costs two gradients; 0: plain steps")
flags.DEFINE_bool("expert_augment", True, "SpecAugment-style augmentation while training experts")
flags.DEFINE_enum("trajectory_dtype", "float32", ["float32", "float16"], "storage dtype of expert trajectories")
flags.DEFINE_enum("parallel", "auto", ["auto", "vmap", "loop"],
                  "train several models (experts, eval seeds) in one vmapped program or one by one; auto: per backend")
flags.DEFINE_enum("epoch_mode", "auto", ["auto", "scan", "host"],
                  "one jitted lax.scan per epoch, or a host loop of jitted steps; auto: per backend")
# --- distillation ------------------------------------------------------------------------------
flags.DEFINE_integer("ipc", 10, "synthetic samples per class (paper: 1..150)")
flags.DEFINE_integer("syn_steps", 20, "inner SGD steps per outer step (paper: 20)")
flags.DEFINE_integer("expert_epochs", 3, "expert epochs matched per outer step (paper: 3)")
flags.DEFINE_integer("max_start_epoch", 30, "start epoch drawn from [min_start_epoch, max_start_epoch) (paper: 30)")
flags.DEFINE_integer("min_start_epoch", 0, "first start epoch drawn (paper, MTT: 0; DATM moves the window up for "
                     "larger sets)")
flags.DEFINE_integer("batch_syn", 0, "inner minibatch (0: whole synthetic set)")
flags.DEFINE_integer("iterations", 60, "outer steps (paper: 60)")
flags.DEFINE_float("lr_img", 1000.0, "SGD step on the synthetic spectrograms (paper: 1000)")
flags.DEFINE_float("lr_lr", 1e-3, "SGD step (momentum --outer_momentum) on the learnable lr (paper, MTT: 1e-3 on the raw lr)")
flags.DEFINE_enum("lr_param", "raw", ["raw", "log"], "learn the raw inner lr (MTT, the paper) or log(lr)")
flags.DEFINE_float("lr_min", 1e-6, "floor of the learned raw lr (kept positive; hits are counted and reported)")
flags.DEFINE_float("lr_init", 1e-3, "initial learnable inner lr (paper: 1e-3); 0: measured, the lr at which "
                   "--syn_steps student steps on the starting set travel as far as the experts in --expert_epochs")
flags.DEFINE_float("outer_momentum", 0.5, "momentum of the outer SGD optimisers")
flags.DEFINE_bool("learn_labels", False, "learn soft labels too")
flags.DEFINE_float("lr_labels", 2.0, "SGD step on the soft-label logits")
flags.DEFINE_string("label_init", "onehot", "with --learn_labels, where the soft labels start: onehot (5 x one-hot "
                    "logits) or expert (the experts' logits on each starting sample, DATM; one-hot where they "
                    "misclassify it)")
flags.DEFINE_enum("syn_init", "real", list(distill.INITS),
                  "synthetic set initialisation: random real clips (MTT), the herding coreset's clips, means of "
                  "--syn_init_mix random real clips (mix) or of those nearest the centres of k-means clusters of "
                  "the class (kmeans), or noise")
flags.DEFINE_integer("syn_init_mix", 8, "--syn_init=mix or kmeans: real clips of the class averaged per synthetic "
                     "sample")
flags.DEFINE_float("syn_init_noise", 0.0, "--syn_init=real, herding, mix or kmeans: Gaussian noise added to each "
                   "starting sample, std in units of the sample's own spread (its source clips become harder to recover)")
flags.DEFINE_bool("syn_augment", True, "differentiable SpecAugment in the inner loop (and in evaluation)")
flags.DEFINE_enum("remat", "auto", list(distill.REMAT_CHOICES),
                  "rematerialisation of the inner loop; auto: the fastest (none, step, nested) whose compiled step "
                  "fits the device's free memory")
flags.DEFINE_integer("remat_segment", 0, "steps per checkpointed segment (nested); 0: divisor of syn_steps nearest its sqrt")
flags.DEFINE_enum("max_pool", "auto", list(models.MAX_POOLS),
                  "2x2 max pooling of cnn6/vgg15: blocks (reshape + max, elementwise gradients) or window "
                  "(reduce_window, select-and-scatter gradients), same outputs; auto: window on CPU, blocks elsewhere")
flags.DEFINE_integer("scan_unroll", 0, "inner scan unroll factor; 0: per backend (full on CPU, 1 on GPU/TPU)")
compile_cache.define_flag()
flags.DEFINE_integer("mesh_devices", 0, "spread the experts, the synthetic set and the evaluation seeds over this many "
                     "devices (0: one device)")
flags.DEFINE_string("coordinator_address", "", "multi-host: host:port of process 0 (enables jax.distributed)")
flags.DEFINE_integer("num_processes", 1, "multi-host: number of processes")
flags.DEFINE_integer("process_id", 0, "multi-host: this process's index")
flags.DEFINE_bool("tune", False, "before distilling, try the settings of --tune_grid (short distillations from the "
                  "same experts, scored on validation speakers) and distil with the best; resumable")
flags.DEFINE_string("tune_grid", "lr_img=100,300,1000;lr_init=0,0.01",
                    "--tune: name=v1,v2;name=v1,v2 over "
                    + ", ".join(flag for _, flag in tune_lib.TUNABLE.values()))
flags.DEFINE_integer("tune_iterations", 0, "--tune: outer steps per trial (0: --iterations)")
flags.DEFINE_integer("tune_trials", 0, "--tune: at most this many trials, a seeded sample of the grid (0: all)")
flags.DEFINE_integer("eval_every", 0, "validate the synthetic set every N iterations and keep the best (0: keep the last)")
flags.DEFINE_enum("select_lr", "learned", list(pipeline.SELECT_LR), "each validation of the synthetic set during "
                 "distillation trains at: learned (the lr training on it will use) or candidates (each of the final "
                 "evaluation's lr candidates, scored by the best: the starting set is judged as fairly as the rest)")
flags.DEFINE_integer("checkpoint_every", 50, "checkpoint the distillation every N iterations")
flags.DEFINE_integer("log_every", 10, "write metrics every N iterations (the only host syncs of the loop)")
# --- evaluation --------------------------------------------------------------------------------
flags.DEFINE_integer("eval_seeds", 5, "random initialisations / random subsets per evaluated setting")
flags.DEFINE_integer("eval_fixed_inits", 0, "the settings trained from the experts' initialisations (distilled "
                     "fixed init, herding, ...) train from the first N of them (0: every expert's)")
flags.DEFINE_integer("eval_epochs", 300, "epochs when training on the distilled set or a random subset")
flags.DEFINE_list("eval_lr_grid", ["0.3", "1", "3"], "lr candidates of every small-set setting (distilled, random "
                  "subset, herding), each choosing on validation: the learned lr and --expert_lr x each of these "
                  "(empty: the learned lr alone)")
flags.DEFINE_integer("eval_lr_extend", 0, "when a small-set setting's best lr on validation is the largest "
                     "candidate, try up to N more, each 3x the last, stopping at the first that does not raise "
                     "validation UAR (0: the candidates only)")
flags.DEFINE_enum("eval_lr_choice", "each", list(protocol.LR_CHOICES),
                  "each: every small-set setting chooses its lr among the candidates on validation; shared: the "
                  "random subset chooses (per trained model) and every other setting trains at its choice (one "
                  "training per setting instead of one per candidate)")
flags.DEFINE_enum("eval_optimizer", "learned_sgd", list(protocol.EVAL_OPTIMIZERS),
                  "training on distilled/subset data: learned_sgd (plain SGD, the learned lr), mtt (MTT's evaluation: "
                  "momentum 0.9, weight decay 5e-4, learned lr x0.1 at half the epochs) or expert (the experts' "
                  "optimiser and schedule, the paper)")
flags.DEFINE_integer("eval_select_every", 0, "when training on distilled/subset data, check validation UAR every N "
                     "epochs and keep each model at its best (early stopping for every setting alike; 0: last epoch)")
flags.DEFINE_integer("eval_patience", 0, "stop training on distilled/subset data once no model improved on "
                     "validation for N checks of --eval_select_every (0: train every epoch)")
flags.DEFINE_integer("reference_epochs", 0, "full-data reference models (the ratio's denominator): epochs, each "
                     "kept at its best validation UAR (0: --expert_train_epochs)")
flags.DEFINE_integer("eval_batch_size", 0, "minibatch when training on distilled/subset data (0: --expert_batch_size)")
flags.DEFINE_integer("render_per_class", 2, "Griffin-Lim WAV renders per class")
flags.DEFINE_list("baselines", [], "compared beyond the random subset and herding (always run): kcenter (greedy "
                  "k-center coreset in a trained expert's feature space), dm (distribution matching, Zhao & Bilen "
                  "2023, a second distillation method at the same size)")
flags.DEFINE_list("eval_models", [], "also train these model families (convnet, cnn6, vgg15, resnet9) on every "
                  "small set and on the full data, from random initialisations (cross-architecture evaluation)")
flags.DEFINE_integer("dm_iterations", 500, "--baselines=dm: outer steps (one random network each)")
flags.DEFINE_float("dm_lr_img", 1.0, "--baselines=dm: SGD step on the spectrograms (momentum 0.5)")
flags.DEFINE_integer("dm_batch_real", 64, "--baselines=dm: real clips per class per step")
flags.DEFINE_bool("privacy_audit", True, "distances of the distilled set to the closest training clips and a "
                  "membership-inference attack on full-data vs distilled-trained models (report.json 'privacy')")
flags.DEFINE_float("mia_holdout", 0.0, "share of each training speaker's clips kept out of every stage as "
                   "same-speaker non-members for membership inference (0: none; e.g. 0.1)")


RUN_FLAGS = tuple(name for name in F if name not in _BEFORE)    # the runner's own flags, definition order
KEY_FLAGS = ("flagfile", "corpus", "corpus_dir", "workdir", "protocol", "model", "ipc", "stage")
SKIP_IN_COMMAND = ("overwrite",)


def command_flags(argv: list[str]) -> str:
    """A flag file that re-runs this run: every runner flag at its value (defaults included, so a
    later sersynth with other defaults still reproduces it), after the command line as typed."""
    lines = ["# sersynth run: re-run with  sersynth run --flagfile=<this file>", "# as typed: " + " ".join(argv)]
    lines += [F[name].serialize() for name in RUN_FLAGS if name not in SKIP_IN_COMMAND and F[name].value is not None]
    return "\n".join(line for line in lines if line) + "\n"


def config_from_flags() -> pipeline.RunConfig:
    """The run's settings from the flags (and ``--max_pool`` and ``--compile_cache`` applied to
    what is built and compiled from here on)."""
    models.set_max_pool(F.max_pool)
    compile_cache.apply_flags()
    stages = tuple(pipeline.STAGES) if F.stage == ["all"] else tuple(F.stage)
    try:
        split = tuple(float(v) for v in F.split)
        lr_grid = tuple(float(v) for v in F.eval_lr_grid)
    except ValueError as e:
        raise pipeline.RunError(f"--split / --eval_lr_grid must be numbers: {e}") from None
    try:
        tune = tune_lib.TuneConfig(grid=tune_lib.parse_grid(F.tune_grid), iterations=F.tune_iterations,
                                   max_trials=F.tune_trials) if F.tune else tune_lib.TuneConfig()
    except ValueError as e:
        raise pipeline.RunError(str(e)) from None
    if len(split) != 3:
        raise pipeline.RunError(f"--split needs three fractions (train,val,test), got {F.split}")
    return pipeline.RunConfig(
        workdir=F.workdir, stages=stages, seed=F.seed, overwrite=F.overwrite, progress=F.progress,
        tensorboard=F.tensorboard, corpus=F.corpus, corpus_dir=F.corpus_dir, cache_dir=F.cache_dir,
        embedded_speakers=F.embedded_speakers, embedded_utterances=F.embedded_utterances,
        fold=F.fold,
        prepare={"emotions": tuple(F.emotions), "split_fractions": split, "split_seed": F.split_seed,
                 "workers": F.workers, "strict": F.strict, "max_clip_seconds": F.max_clip_seconds,
                 "protocol": F.protocol, "val_speakers": F.val_speakers,
                 "test_corpus": F.test_corpus, "label_map": tuple(F.label_map),
                 "features": {"sample_rate": F.sample_rate, "n_fft": F.n_fft, "hop_length": F.hop_length,
                              "n_mels": F.n_mels, "fmin": F.fmin, "fmax": F.fmax, "clip_seconds": F.clip_seconds}},
        model={"name": F.model, "width": F.width, "depth": F.depth, "width_mult": F.width_mult, "norm": F.norm,
               "compute_dtype": models.resolve_compute_dtype(F.compute_dtype), "kernel": F.kernel_size},
        expert_train=train.TrainConfig(
            optimizer=F.expert_optimizer, lr=F.expert_lr, momentum=F.expert_momentum,
            weight_decay=F.expert_weight_decay, lr_decay=F.expert_lr_decay, lr_decay_every=F.expert_lr_decay_every,
            epochs=F.expert_train_epochs, batch_size=F.expert_batch_size, augment=F.expert_augment,
            min_steps_per_epoch=F.expert_min_steps_per_epoch, sam_rho=F.expert_sam_rho),
        n_experts=F.n_experts, trajectory_dtype=F.trajectory_dtype,
        parallel="" if F.parallel == "auto" else F.parallel, epoch_mode="" if F.epoch_mode == "auto" else F.epoch_mode,
        distill=distill.DistillConfig(
            ipc=F.ipc, syn_steps=F.syn_steps, expert_epochs=F.expert_epochs, max_start_epoch=F.max_start_epoch,
            min_start_epoch=F.min_start_epoch,
            batch_syn=F.batch_syn, iterations=F.iterations, lr_img=F.lr_img, momentum=F.outer_momentum,
            lr_init=F.lr_init, lr_lr=F.lr_lr, lr_param=F.lr_param, lr_min=F.lr_min, learn_labels=F.learn_labels,
            lr_labels=F.lr_labels, label_init=F.label_init, init=F.syn_init,
            init_mix=F.syn_init_mix, init_noise=F.syn_init_noise,
            augment=F.syn_augment, remat=F.remat, segment=F.remat_segment, unroll=F.scan_unroll),
        mesh_devices=F.mesh_devices, eval_every=F.eval_every, checkpoint_every=F.checkpoint_every, log_every=F.log_every,
        eval_seeds=F.eval_seeds, eval_fixed_inits=F.eval_fixed_inits, eval_epochs=F.eval_epochs,
        eval_lr_grid=lr_grid, eval_lr_extend=F.eval_lr_extend, eval_lr_choice=F.eval_lr_choice,
        select_lr=F.select_lr,
        eval_optimizer=F.eval_optimizer,
        eval_batch_size=F.eval_batch_size, eval_select_every=F.eval_select_every, eval_patience=F.eval_patience, tune=tune, reference_epochs=F.reference_epochs,
        render_per_class=F.render_per_class, privacy_audit=F.privacy_audit, mia_holdout=F.mia_holdout,
        baselines=tuple(F.baselines),
        eval_models=tuple(F.eval_models), experts_dir=F.experts_dir,
        dm=dm_lib.DMConfig(iterations=F.dm_iterations, lr_img=F.dm_lr_img, batch_real=F.dm_batch_real))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        dist.initialize(F.coordinator_address, F.num_processes, F.process_id)
        cfg = config_from_flags()
        pipeline.run(cfg, command=command_flags(sys.argv))
    except (pipeline.RunError, ValueError, FileNotFoundError, FileExistsError, distill.DistillDiverged) as e:
        logging.debug("run failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli(argv: list[str] | None = None) -> None:
    from sersynth.cli import short_help

    argv = list(sys.argv if argv is None else argv)
    short_help(argv, KEY_FLAGS, __doc__)
    flags.mark_flag_as_required("workdir")
    app.run(main, argv=argv)


if __name__ == "__main__":
    cli()
