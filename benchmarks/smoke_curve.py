r"""The smoke pipeline's learning curve from a workdir's TensorBoard events: the ldm loss and the periodic prompt
agreement (colour; colour and position) against the step and against wall-clock minutes since the run started,
with the first stage's validation PSNR; writes one PNG (docs/smoke_curve.png in the README).

  python -m latent_diffusion.main --config=configs/txt2img.py:smoke --workdir=/tmp/ldm
  python benchmarks/smoke_curve.py --workdir=/tmp/ldm --out=docs/smoke_curve.png
Needs matplotlib (the `notebook` extra).
"""

import argparse
import glob
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position


def read_scalars(logdir):
  """{tag: sorted [(step, wall_time, value)]} of the scalar summaries under `logdir`."""
  values = {}
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        array = tf.make_ndarray(v.tensor)
        if array.ndim == 0:
          values.setdefault(v.tag, []).append((event.step, event.wall_time, float(array)))
  return {k: sorted(v) for k, v in values.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default='docs/smoke_curve.png')
  args = parser.parse_args()
  ae = read_scalars(os.path.join(args.workdir, 'autoencoder'))
  ldm = read_scalars(os.path.join(args.workdir, 'ldm'))
  start = min(t for series in (*ae.values(), *ldm.values()) for _, t, _ in series)
  minutes = lambda series: [(t - start) / 60 for _, t, _ in series]
  steps = lambda series: [s for s, _, _ in series]
  vals = lambda series: [v for _, _, v in series]

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  loss = ldm['train/loss']
  agreement = {'colour': ldm['val/prompt_agreement/colour'],
               'colour and position': ldm['val/prompt_agreement/colour_position']}
  for ax, x, label in ((axes[0], steps, 'ldm step'), (axes[1], minutes, 'minutes since the run started')):
    ax.plot(x(loss), vals(loss), color='tab:gray', label='ldm train loss (min-SNR weighted)')
    ax.set_xlabel(label)
    ax.set_ylabel('loss')
    ax.set_yscale('log')
    twin = ax.twinx()
    for (name, series), colour in zip(agreement.items(), ('tab:blue', 'tab:red')):
      twin.plot(x(series), vals(series), 'o-', color=colour, label=f'prompt agreement: {name}')
    twin.axhline(0.75, color='tab:red', linestyle=':', linewidth=1)
    twin.set_ylim(0, 1)
    twin.set_ylabel('fraction of prompted objects (32 samples)')
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc='center right', fontsize=8)
  psnr = ae['val/psnr']
  axes[2].plot(minutes(psnr), vals(psnr), 'o-', color='tab:green')
  axes[2].axhline(28, color='tab:green', linestyle=':', linewidth=1)
  axes[2].set_xlabel('minutes since the run started')
  axes[2].set_ylabel('autoencoder validation PSNR (dB)')
  axes[0].set_title('txt2img:smoke ldm stage against its step')
  axes[1].set_title('... against wall-clock')
  axes[2].set_title('autoencoder stage')
  fig.tight_layout()
  fig.savefig(args.out, dpi=80)
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
