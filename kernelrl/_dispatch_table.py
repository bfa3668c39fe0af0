"""Built-in dispatch table: measured backend choices per GPU model, shipped with kernelrl.

Consulted after this machine's tuned file and before the default order (kernelrl.backend).
TABLE[op][GPU model name][dtype name] is an entry as ``kernelrl tune`` writes it:
{"choice": backend, "date": "YYYY-MM-DD", "median_ms": {backend: ms}, "errors": {...},
"rejected": {backend: why}, ...}.

Seeded from a tune run on a GPU, from a checkout. benchmarks/gpu_check.sh runs
``kernelrl tune --device cuda --out benchmarks/results/tune-<gpu>-<date>.json``; then

    kernelrl tune --seed-builtin benchmarks/results/tune-<gpu>-<date>.json

merges that file's CUDA entries here (other GPUs' entries are kept).

This file is rewritten by ``--seed-builtin``; edit TABLE only through it.
"""

TABLE = {'kl_penalized_advantages': {'NVIDIA H200': {'bfloat16': {'choice': 'native',
                                                          'date': '2026-11-30',
                                                          'device_type': 'cuda',
                                                          'errors': {'native': {'bound': 0.01,
                                                                                'passed': True,
                                                                                'torch_vs_float64': 8.67e-08,
                                                                                'vs_float64': 2.77e-07,
                                                                                'vs_torch': 2.79e-07,
                                                                                'worst': 'output '
                                                                                         '1 '
                                                                                         '(B=1024 '
                                                                                         'T=4096)'},
                                                                     'torch': {'bound': 0.01,
                                                                               'passed': True,
                                                                               'torch_vs_float64': 8.67e-08,
                                                                               'vs_float64': 8.67e-08,
                                                                               'vs_torch': 0.0,
                                                                               'worst': 'output '
                                                                                        '1 '
                                                                                        '(B=1024 '
                                                                                        'T=4096)'},
                                                                     'triton': {'bound': 0.01,
                                                                                'passed': True,
                                                                                'torch_vs_float64': 8.67e-08,
                                                                                'vs_float64': 8.22e-08,
                                                                                'vs_torch': 1.15e-07,
                                                                                'worst': 'output '
                                                                                         '1 '
                                                                                         '(B=1024 '
                                                                                         'T=4096)'}},
                                                          'examples': ['B=256 T=1024',
                                                                       'B=1024 T=4096'],
                                                          'kernelrl': '0.1.0',
                                                          'median_ms': {'native': 0.4346,
                                                                        'torch': 3.384,
                                                                        'triton': 0.9015},
                                                          'rejected': {},
                                                          'reps': 5,
                                                          'threads': None,
                                                          'timed_examples': ['B=256 T=1024',
                                                                             'B=1024 T=4096'],
                                                          'torch': '2.11.0+cu130',
                                                          'unavailable': {}},
                                             'float32': {'choice': 'native',
                                                         'date': '2026-11-30',
                                                         'device_type': 'cuda',
                                                         'errors': {'native': {'bound': 1e-05,
                                                                               'passed': True,
                                                                               'torch_vs_float64': 8.72e-08,
                                                                               'vs_float64': 2.77e-07,
                                                                               'vs_torch': 2.79e-07,
                                                                               'worst': 'output '
                                                                                        '1 '
                                                                                        '(B=1024 '
                                                                                        'T=4096)'},
                                                                    'torch': {'bound': 1e-05,
                                                                              'passed': True,
                                                                              'torch_vs_float64': 8.72e-08,
                                                                              'vs_float64': 8.72e-08,
                                                                              'vs_torch': 0.0,
                                                                              'worst': 'output '
                                                                                       '1 '
                                                                                       '(B=1024 '
                                                                                       'T=4096)'},
                                                                    'triton': {'bound': 1e-05,
                                                                               'passed': True,
                                                                               'torch_vs_float64': 8.72e-08,
                                                                               'vs_float64': 8.25e-08,
                                                                               'vs_torch': 1.15e-07,
                                                                               'worst': 'output '
                                                                                        '1 '
                                                                                        '(B=1024 '
                                                                                        'T=4096)'}},
                                                         'examples': ['B=256 T=1024',
                                                                      'B=1024 T=4096'],
                                                         'kernelrl': '0.1.0',
                                                         'median_ms': {'native': 0.4591,
                                                                       'torch': 3.213,
                                                                       'triton': 0.9264},
                                                         'rejected': {},
                                                         'reps': 5,
                                                         'threads': None,
                                                         'timed_examples': ['B=256 T=1024',
                                                                            'B=1024 T=4096'],
                                                         'torch': '2.11.0+cu130',
                                                         'unavailable': {}}}},
 'linear_logprobs': {'NVIDIA H200': {'bfloat16': {'choice': 'native',
                                                  'date': '2026-11-30',
                                                  'device_type': 'cuda',
                                                  'errors': {'native': {'bound': 0.01,
                                                                        'passed': True,
                                                                        'torch_vs_float64': 0.004,
                                                                        'vs_float64': 0.004,
                                                                        'vs_torch': 1.24e-05,
                                                                        'worst': 'grad of arg '
                                                                                 '0 (N=8192 '
                                                                                 'H=4096 '
                                                                                 'V=128256 '
                                                                                 'reduction=mean)'},
                                                             'torch': {'bound': 0.01,
                                                                       'passed': True,
                                                                       'torch_vs_float64': 0.004,
                                                                       'vs_float64': 0.004,
                                                                       'vs_torch': 0.0,
                                                                       'worst': 'grad of arg 0 '
                                                                                '(N=8192 '
                                                                                'H=4096 '
                                                                                'V=128256 '
                                                                                'reduction=mean)'},
                                                             'triton': {'bound': 0.01,
                                                                        'passed': True,
                                                                        'torch_vs_float64': 0.004,
                                                                        'vs_float64': 0.004,
                                                                        'vs_torch': 1.17e-05,
                                                                        'worst': 'grad of arg '
                                                                                 '0 (N=8192 '
                                                                                 'H=4096 '
                                                                                 'V=128256 '
                                                                                 'reduction=mean)'}},
                                                  'examples': ['N=8192 H=4096 V=128256 '
                                                               'reduction=none',
                                                               'N=8192 H=4096 V=128256 '
                                                               'reduction=mean'],
                                                  'kernelrl': '0.1.0',
                                                  'median_ms': {'native': 108.5,
                                                                'torch': 198.9,
                                                                'triton': 119.5},
                                                  'rejected': {},
                                                  'reps': 5,
                                                  'threads': None,
                                                  'timed_examples': ['N=8192 H=4096 V=128256 '
                                                                     'reduction=none',
                                                                     'N=8192 H=4096 V=128256 '
                                                                     'reduction=mean'],
                                                  'torch': '2.11.0+cu130',
                                                  'unavailable': {}},
                                     'float32': {'choice': 'native',
                                                 'date': '2026-11-30',
                                                 'device_type': 'cuda',
                                                 'errors': {'native': {'bound': 1e-05,
                                                                       'passed': True,
                                                                       'torch_vs_float64': 1.59e-06,
                                                                       'vs_float64': 1.59e-06,
                                                                       'vs_torch': 4.19e-08,
                                                                       'worst': 'grad of arg 0 '
                                                                                '(N=8192 '
                                                                                'H=4096 '
                                                                                'V=128256 '
                                                                                'reduction=none)'},
                                                            'torch': {'bound': 1e-05,
                                                                      'passed': True,
                                                                      'torch_vs_float64': 1.59e-06,
                                                                      'vs_float64': 1.59e-06,
                                                                      'vs_torch': 0.0,
                                                                      'worst': 'grad of arg 0 '
                                                                               '(N=8192 H=4096 '
                                                                               'V=128256 '
                                                                               'reduction=none)'},
                                                            'triton': {'bound': 1e-05,
                                                                       'passed': True,
                                                                       'torch_vs_float64': 1.59e-06,
                                                                       'vs_float64': 1.59e-06,
                                                                       'vs_torch': 7.12e-08,
                                                                       'worst': 'grad of arg 0 '
                                                                                '(N=8192 '
                                                                                'H=4096 '
                                                                                'V=128256 '
                                                                                'reduction=none)'}},
                                                 'examples': ['N=8192 H=4096 V=128256 '
                                                              'reduction=none',
                                                              'N=8192 H=4096 V=128256 '
                                                              'reduction=mean'],
                                                 'kernelrl': '0.1.0',
                                                 'median_ms': {'native': 685.7,
                                                               'torch': 724.7,
                                                               'triton': 686.0},
                                                 'rejected': {},
                                                 'reps': 5,
                                                 'threads': None,
                                                 'timed_examples': ['N=8192 H=4096 V=128256 '
                                                                    'reduction=none'],
                                                 'torch': '2.11.0+cu130',
                                                 'unavailable': {}}}},
 'ppo_loss': {'NVIDIA H200': {'bfloat16': {'choice': 'triton',
                                           'date': '2026-11-30',
                                           'device_type': 'cuda',
                                           'errors': {'torch': {'bound': 0.01,
                                                                'passed': True,
                                                                'torch_vs_float64': 0.00166,
                                                                'vs_float64': 0.00166,
                                                                'vs_torch': 0.0,
                                                                'worst': 'grad of arg 0 (GRPO '
                                                                         'B=256 T=2048)'},
                                                      'triton': {'bound': 0.01,
                                                                 'passed': True,
                                                                 'torch_vs_float64': 0.00166,
                                                                 'vs_float64': 0.00166,
                                                                 'vs_torch': 1.58e-05,
                                                                 'worst': 'grad of arg 0 (GRPO '
                                                                          'B=256 T=2048)'}},
                                           'examples': ['PPO B=256 T=2048',
                                                        'GRPO B=256 T=2048'],
                                           'kernelrl': '0.1.0',
                                           'median_ms': {'torch': 5.012, 'triton': 2.25},
                                           'rejected': {},
                                           'reps': 5,
                                           'threads': None,
                                           'timed_examples': ['PPO B=256 T=2048',
                                                              'GRPO B=256 T=2048'],
                                           'torch': '2.11.0+cu130',
                                           'unavailable': {}},
                              'float32': {'choice': 'triton',
                                          'date': '2026-11-30',
                                          'device_type': 'cuda',
                                          'errors': {'torch': {'bound': 1e-05,
                                                               'passed': True,
                                                               'torch_vs_float64': 7.31e-08,
                                                               'vs_float64': 7.31e-08,
                                                               'vs_torch': 0.0,
                                                               'worst': 'grad of arg 0 (GRPO '
                                                                        'B=256 T=2048)'},
                                                     'triton': {'bound': 1e-05,
                                                                'passed': True,
                                                                'torch_vs_float64': 7.31e-08,
                                                                'vs_float64': 6.76e-08,
                                                                'vs_torch': 5.38e-08,
                                                                'worst': 'grad of arg 0 (GRPO '
                                                                         'B=256 T=2048)'}},
                                          'examples': ['PPO B=256 T=2048', 'GRPO B=256 T=2048'],
                                          'kernelrl': '0.1.0',
                                          'median_ms': {'torch': 2.573, 'triton': 1.098},
                                          'rejected': {},
                                          'reps': 5,
                                          'threads': None,
                                          'timed_examples': ['PPO B=256 T=2048'],
                                          'torch': '2.11.0+cu130',
                                          'unavailable': {}}}},
 'token_logprobs': {'NVIDIA H200': {'bfloat16': {'choice': 'triton',
                                                 'date': '2026-11-30',
                                                 'device_type': 'cuda',
                                                 'errors': {'native': {'bound': 0.01,
                                                                       'passed': True,
                                                                       'torch_vs_float64': 0.00169,
                                                                       'vs_float64': 0.00169,
                                                                       'vs_torch': 7.63e-07,
                                                                       'worst': 'grad of arg 0 '
                                                                                '(N=4096 '
                                                                                'V=32000)'},
                                                            'torch': {'bound': 0.01,
                                                                      'passed': True,
                                                                      'torch_vs_float64': 0.00169,
                                                                      'vs_float64': 0.00169,
                                                                      'vs_torch': 0.0,
                                                                      'worst': 'grad of arg 0 '
                                                                               '(N=4096 '
                                                                               'V=32000)'},
                                                            'triton': {'bound': 0.01,
                                                                       'passed': True,
                                                                       'torch_vs_float64': 0.00169,
                                                                       'vs_float64': 0.00169,
                                                                       'vs_torch': 7.91e-07,
                                                                       'worst': 'grad of arg 0 '
                                                                                '(N=4096 '
                                                                                'V=32000)'}},
                                                 'examples': ['N=4096 V=32000',
                                                              'N=4096 V=128256'],
                                                 'kernelrl': '0.1.0',
                                                 'median_ms': {'native': 3.372,
                                                               'torch': 30.0,
                                                               'triton': 3.035},
                                                 'rejected': {},
                                                 'reps': 5,
                                                 'threads': None,
                                                 'timed_examples': ['N=4096 V=32000',
                                                                    'N=4096 V=128256'],
                                                 'torch': '2.11.0+cu130',
                                                 'unavailable': {}},
                                    'float32': {'choice': 'triton',
                                                'date': '2026-11-30',
                                                'device_type': 'cuda',
                                                'errors': {'native': {'bound': 1e-05,
                                                                      'passed': True,
                                                                      'torch_vs_float64': 3.35e-08,
                                                                      'vs_float64': 3.47e-08,
                                                                      'vs_torch': 2.71e-08,
                                                                      'worst': 'output 0 '
                                                                               '(N=4096 '
                                                                               'V=128256)'},
                                                           'torch': {'bound': 1e-05,
                                                                     'passed': True,
                                                                     'torch_vs_float64': 3.35e-08,
                                                                     'vs_float64': 3.35e-08,
                                                                     'vs_torch': 0.0,
                                                                     'worst': 'output 0 '
                                                                              '(N=4096 '
                                                                              'V=128256)'},
                                                           'triton': {'bound': 1e-05,
                                                                      'passed': True,
                                                                      'torch_vs_float64': 3.04e-08,
                                                                      'vs_float64': 5.98e-08,
                                                                      'vs_torch': 5.63e-08,
                                                                      'worst': 'grad of arg 0 '
                                                                               '(N=4096 '
                                                                               'V=128256)'}},
                                                'examples': ['N=4096 V=32000',
                                                             'N=4096 V=128256'],
                                                'kernelrl': '0.1.0',
                                                'median_ms': {'native': 4.427,
                                                              'torch': 26.62,
                                                              'triton': 2.861},
                                                'rejected': {},
                                                'reps': 5,
                                                'threads': None,
                                                'timed_examples': ['N=4096 V=32000',
                                                                   'N=4096 V=128256'],
                                                'torch': '2.11.0+cu130',
                                                'unavailable': {}}}}}
