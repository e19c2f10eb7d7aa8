r"""FID reference statistics (pytorch-fid's `.npz`: `mu`, `sigma`, plus `features` for precision/recall) of a
dataset split, preprocessed as training sees it (centre crop, resize to data.resolution):
  python -m latent_diffusion.evaluation.reference_stats --config=configs/txt2img.py:smoke --split=validation \
      --num_images=10000 --out=captioned_shapes_32_validation.npz
Point `eval.reference_stats` at the file. Any TFDS dataset or image folder the config's `data` section names.
"""

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from latent_diffusion import parallel
from latent_diffusion.evaluation import features
from latent_diffusion.evaluation import fid
from latent_diffusion.weights import inception as inception_weights

FLAGS = flags.FLAGS


def main(argv):
  del argv
  tf.config.set_visible_devices([], 'GPU')
  config = FLAGS.config
  mesh = parallel.create_mesh(config.mesh)
  extractor = features.Extractor(inception_weights.load_default(config.eval.inception_weights), mesh,
                                 config.eval.preprocessing)
  pool3 = extractor(features.dataset_batches(config.data, FLAGS.split, config.eval.batch_size, FLAGS.num_images))
  pool3 = pool3['pool3']
  extra = {'features': pool3.astype(np.float32)} if FLAGS.with_features else {}
  if parallel.is_main_process():
    fid.save_statistics(FLAGS.out, *fid.statistics(pool3), **extra)
  print(f'Wrote {FLAGS.out}: statistics of {len(pool3)} images of {config.data.name} {FLAGS.split}.')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Pipeline config whose `data` and `eval` sections are used.')
  flags.DEFINE_string('split', 'validation', 'Dataset split.')
  flags.DEFINE_integer('num_images', 10_000, 'How many images of the split (from its start).')
  flags.DEFINE_string('out', None, 'Output .npz.')
  flags.DEFINE_bool('with_features', True, 'Also store the pool3 features (needed for precision/recall).')
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main)
