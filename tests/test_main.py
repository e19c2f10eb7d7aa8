"""The entry point and configs: stage reporting, config.json, refusal of incompatible workdirs, bad flags."""

import json
import os
import subprocess
import sys

import pytest

from latent_diffusion import config_lib
from latent_diffusion import stages
from latent_diffusion import workdir as workdir_lib
from latent_diffusion.evaluation import evaluator
from configs import txt2img

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', 'latent_diffusion.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


TINY_AUTOENCODER = ('--config.autoencoder.total_steps=2', '--config.autoencoder.model.ch_mult=(1,2)',
                    '--config.autoencoder.batch_size=8', '--config.autoencoder.eval.num_images=8')


@pytest.mark.slow  # 70-120 s in the full run: CI and the README command run it
def test_a_stage_writes_the_config_and_incompatible_reruns_are_refused(tmp_path, tfds_dir):
  smoke = ('--config=configs/txt2img.py:smoke', f'--workdir={tmp_path}', f'--config.data.data_dir={tfds_dir}',
           '--stage=autoencoder', *TINY_AUTOENCODER)
  result = main(*smoke)
  assert result.returncode == 0, result.stderr
  assert 'stage autoencoder  ran' in result.stdout
  assert (tmp_path / 'autoencoder' / 'checkpoints' / '2').is_dir()
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['data']['name'] == 'captioned_shapes/32'
  assert saved['autoencoder']['model']['z_channels'] == 3

  changed = main(*smoke, '--config.data.resolution=64', '--config.ldm.unet.model_channels=96')
  assert changed.returncode != 0
  assert 'data.resolution: 32 (workdir) != 64 (now)' in changed.stderr
  assert 'ldm.unet.model_channels: 64 (workdir) != 96 (now)' in changed.stderr
  assert json.loads((tmp_path / 'config.json').read_text()) == saved  # nothing overwritten

  harmless = main(*smoke, '--config.ldm.total_steps=10')
  assert harmless.returncode == 0, harmless.stderr
  assert 'from step 2 to 2' in harmless.stderr  # resumed, nothing left to train
  assert json.loads((tmp_path / 'config.json').read_text())['ldm']['total_steps'] == 10


def test_eval_without_inception_weights_stops_before_any_compute(tmp_path):
  result = main('--config=configs/txt2img.py:smoke', f'--workdir={tmp_path}', '--stage=eval',
                f'--config.eval.inception_weights={tmp_path}/fid_inception.msgpack')
  assert result.returncode != 0
  assert 'fid_inception.msgpack' in result.stderr and 'pt_inception-2015-12-05-6726825d.pth' in result.stderr
  assert 'python -m latent_diffusion.weights.inception' in result.stderr
  assert not (tmp_path / 'eval').exists()


def test_parsing_the_flags_and_loading_every_config_leaves_jax_s_backend_untouched():
  """jax.distributed.initialize (multi-host runs) must come before any JAX computation, and the entry point
  parses the flags and loads the config before it: imports and configs must not start the backend."""
  script = ("import glob, sys\n"
            "from absl import flags\n"
            "from jax._src import xla_bridge\n"
            "from latent_diffusion import cli, main\n"
            "for path in sorted(glob.glob('configs/*.py')):\n"
            "  if 'sd_finetune' in path: continue\n"
            "  flags.FLAGS.unparse_flags()\n"
            "  sys.argv = ['main', f'--config={path}:smoke', '--workdir=/tmp/unused']\n"
            "  cli.parse_flags(sys.argv)\n"
            "print('configs', flags.FLAGS.config.ldm.batch_size > 0, xla_bridge.backends_are_initialized())\n")
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)
  assert result.stdout.strip().splitlines()[-1:] == ['configs True False'], result.stderr[-3000:]


def test_misspelt_override_and_unknown_stage_are_errors(tmp_path):
  result = main('--config=configs/txt2img.py:smoke', f'--workdir={tmp_path}', '--config.data.resolutoin=64')
  assert result.returncode != 0 and 'resolutoin' in result.stderr
  result = main('--config=configs/txt2img.py:smoke', f'--workdir={tmp_path}', '--stage=train')
  assert result.returncode != 0 and 'stage' in result.stderr
  assert not (tmp_path / 'config.json').exists()


def test_incompatible_fields_ignore_mutable_ones():
  old = txt2img.get_config('smoke').to_dict()
  new = txt2img.get_config('smoke')
  new.data.data_dir = '/elsewhere'
  new.sampling.guidance_scales = (7.0,)
  new.ldm.total_steps = 5
  assert workdir_lib.incompatible_fields(old, new.to_dict()) == []
  new.data.random_flip = True
  new.autoencoder.model.ch_mult = (1, 2)
  assert workdir_lib.incompatible_fields(old, new.to_dict()) == [
      ('autoencoder.model.ch_mult', (1, 2, 2), (1, 2)), ('data.random_flip', False, True)]
  # A field added since the workdir was made matches it at its off value, and only there; norm_groups at the
  # value the runs before it had (32) and only there.
  del old['data']['objects_key'], old['data']['max_objects'], old['autoencoder']['model']['ch_mult']
  del old['autoencoder']['model']['norm_groups']
  assert workdir_lib.incompatible_fields(old, txt2img.get_config('smoke').to_dict()) == [
      ('autoencoder.model.ch_mult', '<absent>', (1, 2, 2))]
  new = txt2img.get_config('smoke')
  new.autoencoder.model.norm_groups = 8
  assert ('autoencoder.model.norm_groups', '<absent>', 8) in workdir_lib.incompatible_fields(old, new.to_dict())
  new.data.max_objects = 2
  assert ('data.max_objects', '<absent>', 2) in workdir_lib.incompatible_fields(old, new.to_dict())


def test_config_arguments():
  default = txt2img.get_config()
  assert default.ldm.unet.model_channels == 320 and default.ldm.unet.channel_mult == (1, 2, 4, 4)
  assert default.ldm.unet.attention_resolutions == (4, 2, 1) and default.ldm.conditioning.width == 1280
  assert (default.ldm.conditioning.depth, default.ldm.conditioning.width) == (32, 1280)
  assert (default.ldm.schedule.beta_start, default.ldm.schedule.beta_end) == (0.00085, 0.012)
  assert default.autoencoder.name == 'kl-f8' and default.latents.scale_factor == 0.18215
  vq = txt2img.get_config('smoke,ae=vq-f4')
  assert vq.autoencoder.model.kind == 'vq' and vq.autoencoder.loss.codebook_weight == 1.0
  with pytest.raises(ValueError, match="Unknown config argument 'smok'"):
    txt2img.get_config('smok')
  with pytest.raises(ValueError, match="Unknown autoencoder 'kl-f5'"):
    txt2img.get_config('ae=kl-f5')


@pytest.mark.parametrize('name', sorted(config_lib.AUTOENCODERS))
def test_autoencoder_table_matches_the_paper(name):
  c = config_lib.autoencoder(name)
  factor = int(name.split('-')[1][1:])
  assert 2 ** (len(c.model.ch_mult) - 1) == factor
  assert (c.model.ch, c.model.num_res_blocks, c.model.dropout, c.model.resolution) == (128, 2, 0.0, 256)
  expected = {'kl-f4': 3, 'kl-f8': 4, 'kl-f16': 16, 'kl-f32': 64, 'vq-f4': 3, 'vq-f4-noattn': 3, 'vq-f8': 4,
              'vq-f16': 8}
  assert c.model.z_channels == expected[name]
  assert c.model.mid_attention == (name != 'vq-f4-noattn')
  if name.startswith('vq'):
    assert c.model.n_embed == (8192 if name.startswith('vq-f4') else 16384)
  else:
    assert (c.loss.disc_start, c.loss.disc_weight, c.loss.kl_weight) == (50001, 0.5, 1e-6)


def test_stage_names_are_the_pipeline_order():
  assert stages.STAGES == ('autoencoder', 'latents', 'ldm', 'sample', 'eval')
  assert stages.selected('all') == stages.STAGES
  assert stages.selected('sample, ldm') == ('ldm', 'sample')  # a list runs in pipeline order
  with pytest.raises(ValueError, match="Unknown stage 'train'"):
    stages.run('train', None, '/tmp')
  with pytest.raises(ValueError, match="Unknown stage 'smaple'"):
    stages.selected('ldm,smaple')


def test_unwritable_or_full_workdir_is_refused_before_any_compute(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  result = main('--config=configs/txt2img.py:smoke', f'--workdir={blocker}/run')
  assert result.returncode != 0 and 'is not writable' in result.stderr and 'choose another workdir' in result.stderr
  with pytest.raises(ValueError, match=r'MiB free on the disk of --workdir=.*free space or use a workdir on another'):
    workdir_lib.check_writable(str(tmp_path / 'run'), min_free_bytes=1 << 60)
  workdir_lib.check_writable(str(tmp_path / 'run'))
  assert list((tmp_path / 'run').iterdir()) == []  # the probe file is removed


def test_the_eval_stage_draws_with_its_own_sampler_where_set():
  config = txt2img.get_config('smoke')
  drawn = evaluator.with_eval_sampler(config).sampling
  assert (drawn.sampler, drawn.num_steps) == ('dpm_solver_pp', 20)  # the smoke eval's 256 samples
  assert (config.sampling.sampler, config.sampling.num_steps) == ('ddim', 50)  # the sample stage's grid, untouched
  config.eval.update(sampler='', num_steps=0)
  drawn = evaluator.with_eval_sampler(config).sampling
  assert (drawn.sampler, drawn.num_steps) == ('ddim', 50)
