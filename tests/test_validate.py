"""A malformed config or flag ends in one `Error:` line naming the field, before anything is written or computed."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from latent_diffusion import parallel
from latent_diffusion import validate
from tests import shipped_configs

REPO = pathlib.Path(__file__).resolve().parents[1]
TWO_PROMPTS = ('--config.sampling.prompts=("a large red circle in the center",'
               '"a small blue square in the top left")')
SMOKE = '--config=configs/txt2img.py:smoke'

# (flags after the config, text the message must contain: the field, and where it helps the value or the fix)
CASES = [
    ([SMOKE, '--config.ldm.unet.attention=flash'], "ldm.unet.attention='flash'"),
    ([SMOKE, '--config.ldm.unet.dtype=float8'], "ldm.unet.dtype='float8'"),
    ([SMOKE, '--config.ldm.unet.attention=pallas_tpu'], "ldm.unet.attention='pallas_tpu' runs on TPUs only"),
    ([SMOKE, '--config.ldm.parameterization=score'], "ldm.parameterization='score'"),
    ([SMOKE, '--config.sampling.sampler=euler'], "sampling.sampler='euler'"),
    ([SMOKE, '--config.ldm.schedule.kind=quadratic'], "ldm.schedule.kind='quadratic'"),
    ([SMOKE, '--config.ldm.conditioning.kind=image'], "ldm.conditioning.kind='image'"),
    ([SMOKE, '--config.ldm.conditioning.concat=depth'], "ldm.conditioning.concat='depth'"),
    ([SMOKE, '--config.ldm.conditioning.tokenizer=sentencepiece'], "ldm.conditioning.tokenizer='sentencepiece'"),
    ([SMOKE, '--config.ldm.loss=l3'], "ldm.loss='l3'"),
    ([SMOKE, '--config.ldm.conditioning.token_conv=-3'], 'ldm.conditioning.token_conv=-3'),
    ([SMOKE, '--config.latents.dtype=int8'], "latents.dtype='int8'"),
    ([SMOKE, '--config.ldm.unet.remat=attention'], "ldm.unet.remat='attention'"),
    ([SMOKE, '--config.ldm.unet.remat_policy=everything'], "ldm.unet.remat_policy='everything'"),
    ([SMOKE, '--config.autoencoder.model.kind=gan'], "autoencoder.model.kind='gan'"),
    ([SMOKE, '--config.ldm.train_schedule.on_nonfinite=ignore'], "ldm.train_schedule.on_nonfinite='ignore'"),
    ([SMOKE, '--config.eval.source=both'], "eval.source='both'"),
    ([SMOKE, '--config.eval.preprocessing=tf'], "eval.preprocessing='tf'"),
    ([SMOKE, '--config.data.resolution=30'], 'data.resolution=30 is not divisible by 4'),
    ([SMOKE, '--config.ldm.unet.channel_mult=(1,2,2,2,2)'], 'the UNet downsamples 4 times'),
    ([SMOKE, '--config.ldm.unet.num_heads=5'], 'ldm.unet.num_heads'),
    ([SMOKE, '--config.ldm.conditioning.depth=2', '--config.ldm.conditioning.num_heads=0'],
     'ldm.conditioning.num_heads=0 must be an integer in [1, inf)'),
    ([SMOKE, '--config.ldm.train_schedule.eval_every=-1'], 'ldm.train_schedule.eval_every=-1'),
    ([SMOKE, '--config.ldm.conditioning.depth=2', '--config.ldm.conditioning.num_heads=3'],
     'ldm.conditioning.width=128 is not divisible by 3'),
    ([SMOKE, '--config.ldm.batch_size=12'], 'ldm.batch_size 12 is not divisible by the 8 batch shards'),
    ([SMOKE, '--config.sampling.batch_size=4'], 'sampling.batch_size 4'),
    ([SMOKE, '--config.mesh.data=3'], 'config.mesh'),
    ([SMOKE, '--config.ldm.conditioning.vocab_file=/no/such/vocab.txt'], 'ldm.conditioning.vocab_file'),
    ([SMOKE, '--config.sampling.prompt_file=/no/such/prompts.txt'], 'sampling.prompt_file'),
    ([SMOKE, '--config.autoencoder.pretrained=/no/such/folder'], 'autoencoder.pretrained'),
    ([SMOKE, '--config.ldm.init_from=/no/such/unet'], 'ldm.init_from'),
    ([SMOKE, '--config.eval.reference_stats=/no/such/stats.npz'], 'eval.reference_stats'),
    ([SMOKE, '--config.data.folder=/no/such/images'], 'data.folder'),
    ([SMOKE, '--config.data.files=/no/such/laion/{00000..00009}.tar', '--config.data.eval_files=tests/*.py',
      '--config.data.files_format=tar'], "data.files='/no/such/laion/{00000..00009}.tar' matches no files"),
    ([SMOKE, '--config.data.files_format=zip'], "data.files_format='zip'"),
    ([SMOKE, '--config.data.files=tests/*.py', '--config.data.files_format=tar'], 'data.eval_files is empty'),
    ([SMOKE, '--config.data.filters.max_aspect_ratio=-2'], 'data.filters.max_aspect_ratio=-2'),
    ([SMOKE, '--config.ldm.optimizer.learning_rate=-1e-4'], 'ldm.optimizer.learning_rate=-0.0001'),
    ([SMOKE, '--config.ldm.optimizer.learning_rate=nan'], 'ldm.optimizer.learning_rate=nan'),
    ([SMOKE, '--config.autoencoder.optimizer.learning_rate=0'], 'autoencoder.optimizer.learning_rate=0'),
    ([SMOKE, '--config.ldm.optimizer.decay=linear'], "ldm.optimizer.decay='linear'"),
    ([SMOKE, '--config.autoencoder.model.norm_groups=64'],
     'autoencoder.model.ch x ch_mult=32 is not divisible by 64 (the GroupNorm groups'),
    ([SMOKE, '--config.ldm.p_uncond=1.5'], 'ldm.p_uncond=1.5'),
    ([SMOKE, '--config.ldm.ema_decay=1.0'], 'ldm.ema_decay=1.0'),
    ([SMOKE, '--config.ldm.total_steps=-5'], 'ldm.total_steps=-5'),
    ([SMOKE, '--config.sampling.num_steps=2000'], 'sampling.num_steps=2000'),
    ([SMOKE, '--config.eval.sampler=euler'], "eval.sampler='euler'"),
    ([SMOKE, '--config.eval.num_steps=-1'], 'eval.num_steps=-1'),
    ([SMOKE, '--config.sampling.prompts=()'], 'sampling.prompts'),
    ([SMOKE, '--config.ldm.conditioning.kind=clip'], 'ldm.conditioning.pretrained'),
    (['--config=configs/class_cond.py:smoke', '--config.ldm.conditioning.num_classes=0'],
     'ldm.conditioning.num_classes'),
    (['--config=configs/semantic.py:smoke', '--config.ldm.conditioning.segmentation_classes=0'],
     'ldm.conditioning.segmentation_classes'),
    (['--config=configs/layout2img.py:smoke', '--config.data.objects_key='], 'data.objects_key'),
    (['--config=configs/layout2img.py:smoke', '--config.ldm.conditioning.layout_tokens=taming'],
     "ldm.conditioning.layout_tokens='taming'"),
    (['--config=configs/layout2img.py:smoke', '--config.ldm.conditioning.layout_tokens=reference',
      '--config.ldm.conditioning.vocab_size=18'], 'ldm.conditioning.vocab_size >= 4 (it is 18) and 1 <= num_classes'),
    ([SMOKE, '--config.autoencoder.tiling.size=4', '--config.autoencoder.tiling.stride=3'],
     'autoencoder.tiling.stride: crops of 4 every 3'),
    ([SMOKE, '--config.sampling.init_images=tests/images'], 'sampling.init_images holds 2 images for 8 conditions'),
    ([SMOKE, '--config.sampling.init_images=tests/images', TWO_PROMPTS,
      '--config.sampling.sampler=plms'],
     "sampling.init_images (img2img) runs the DDIM sampler, not sampling.sampler='plms'"),
    ([SMOKE, '--config.sampling.init_images=nope'], "sampling.init_images: Image folder 'nope' not found"),
    ([SMOKE, '--config.sampling.mask_images=tests/images'], 'sampling.mask_images needs sampling.init_images'),
    ([SMOKE, '--config.sampling.init_images=tests/images', TWO_PROMPTS,
      '--config.sampling.mask_images=nope'], "sampling.mask_images: Image folder 'nope' not found"),
    ([SMOKE, '--config.ldm.lora.rank=-1'], 'ldm.lora.rank=-1'),
    ([SMOKE, '--config.ldm.lora.rank=4', "--config.ldm.lora.targets=('to_x',)"],
     "ldm.lora.targets=('to_x',) names no layer of the UNet"),
    ([SMOKE, '--config.ldm.lora.rank=4', "--config.ldm.lora.text_targets=('q_proj','to_q')"],
     "ldm.lora.text_targets has ['to_q']; name layers of the text encoder as CLIP does"),
    ([SMOKE, '--config.ldm.lora.rank=4', "--config.ldm.lora.text_targets=('q_proj','v_proj')"],
     "ldm.lora.text_targets has ['q_proj', 'v_proj'] alone; our text encoder fuses q, k and v"),
    (['--config=configs/uncond.py:smoke', '--config.ldm.lora.rank=4', "--config.ldm.lora.text_targets=('fc1',)"],
     "ldm.lora.text_targets needs a text encoder, but ldm.conditioning.kind='none'"),
    ([SMOKE, "--config.ldm.lora.text_targets=('fc1',)", '--config.ldm.conditioning.depth=1'],
     'ldm.lora.text_targets is set but ldm.lora.rank=0'),
    ([SMOKE, '--config.ldm.lora.rank=4', "--config.ldm.lora.text_targets=('fc1',)"],
     "ldm.lora.text_targets needs a text encoder, but ldm.conditioning.kind='text' (depth 0)"),
    ([SMOKE, "--config.sampling.prompts=('a red circle',)"], "'a red circle' in the caption 'a red circle' is not"),
    ([SMOKE, "--config.sampling.loras=('nope.safetensors',)"], "sampling.loras='nope.safetensors': no such file"),
    ([SMOKE, "--config.sampling.loras=('README.md',)", '--config.sampling.lora_weights=(1.0,2.0)'],
     'sampling.lora_weights has 2 entries for 1 sampling.loras'),
    ([SMOKE, '--config.sampling.negative_prompts=("a","b")'], 'sampling.negative_prompts has 2 entries for 8'),
    # Mistakes in the flags and the config file itself.
    ([SMOKE, '--config.ldm.batchsize=8'], """--config.ldm.batchsize: the config has no field 'batchsize'; did you """
                                          'mean "batch_size"'),
    ([SMOKE, '--config.ldm.batch_size=abc'], '--config.ldm.batch_size=abc'),
    (['--config=configs/txt2img.py:smok'], "Unknown config argument 'smok'"),
    (['--config=configs/txt2img.py:smoke,ae=kl-f5'], "Unknown autoencoder 'kl-f5'"),
    (['--config=configs/nope.py'], '--config=configs/nope.py: the config file cannot be read'),
    ([SMOKE, '--stage=train'], '--stage=train'),
]


def run_main(argvs):
  """Each argv through `python -m latent_diffusion.main`, all in one subprocess: [(exit status, stderr)]."""
  result = subprocess.run([sys.executable, str(REPO / 'tests' / 'cli_cases.py')], input=json.dumps(argvs),
                          capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return [tuple(r) for r in json.loads(result.stdout.splitlines()[-1])]


@pytest.fixture(scope='module')
def results(shared_dir):
  """Every case of CASES run once per test run, each with a workdir holding one file beforehand:
  [(status, message, the workdir's files after)]."""

  def build(path):
    workdirs = [path / f'run{i}' for i in range(len(CASES))]
    for workdir in workdirs:
      workdir.mkdir()
      (workdir / 'notes.txt').write_text('kept')
    outcomes = run_main([[*argv, f'--workdir={w}'] for (argv, _), w in zip(CASES, workdirs)])
    found = [(status, message, sorted(p.name for p in w.iterdir())) for (status, message), w in zip(outcomes, workdirs)]
    (path / 'results.json').write_text(json.dumps(found))

  return json.loads((shared_dir('cli_cases', build) / 'results.json').read_text())


@pytest.mark.parametrize('index', range(len(CASES)), ids=[' '.join(a[1:]) or a[0] for a, _ in CASES])
def test_a_malformed_config_is_one_error_line_and_writes_nothing(index, results):
  status, message, files = results[index]
  assert status == 1, message
  assert message.startswith('Error: ') and '\n' not in message and 'Traceback' not in message, message
  assert CASES[index][1] in message, message
  assert files == ['notes.txt']


def test_every_problem_is_listed_at_once(tmp_path):
  [(status, message)] = run_main([[SMOKE, '--config.ldm.unet.attention=flash', '--config.sampling.sampler=euler',
                                   '--config.data.resolution=30', f'--workdir={tmp_path / "run"}']])
  lines = message.splitlines()
  assert status == 1 and lines[0] == 'Error: 3 problems in the config:', message
  assert [line.split('=')[0].strip() for line in lines[1:]] == ['data.resolution', 'ldm.unet.attention',
                                                                'sampling.sampler']
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('name', shipped_configs.NAMES + shipped_configs.VARIANTS)
def test_every_shipped_config_passes(name):
  """No false alarms: the full configs on one device, and their smoke variants on the 8 test devices."""
  one_device = parallel.create_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  assert not validate.problems(shipped_configs.load(name), one_device)
  assert not validate.problems(shipped_configs.load(name, 'smoke'))
  # The paper's autoencoder batch of 12 splits over 4 devices but not 8; only the stages run are checked.
  full = shipped_configs.load(name)
  assert validate.problems(full) == ["The global autoencoder.batch_size 12 is not divisible by the 8 batch "
                                     "shards of the mesh {'data': 8, 'fsdp': 1, 'tensor': 1}; change the batch "
                                     'size or config.mesh.']
  assert not validate.problems(full, stage='ldm')
