"""One spelling per flag (issue 19, item 7): every entry script shows its flags with hyphens,
accepts the underscore spelling of each (the authors' and SupContrast's commands), and the
same family has the same name at training and at test time."""
import argparse

import pytest

import select_svhn_data  # noqa: E402  (top-level script)
from ALPA import main_ce, main_linear, main_supcon
from CSD import CSD, feature_collect
from experiments import mode_fmnist, release_checkpoints
from util.cli import Parser, other_spelling
from util.errors import UserError

PARSERS = {
    'main_supcon': main_supcon.get_args_parser, 'main_ce': main_ce.get_args_parser,
    'main_linear': main_linear.get_args_parser, 'feature_collect': feature_collect.get_args_parser,
    'CSD': CSD.get_args_parser, 'mode_fmnist': mode_fmnist.get_args_parser,
    'release_checkpoints': release_checkpoints.get_args_parser, 'select_svhn_data': select_svhn_data.get_args_parser,
}


def optionals(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize('name', sorted(PARSERS))
def test_every_flag_is_shown_with_hyphens_and_takes_its_underscore_spelling(name):
    parser = PARSERS[name]()
    assert isinstance(parser, Parser)
    shown = [a.option_strings[0] for a in optionals(parser)]
    assert shown and all('_' not in s for s in shown), shown
    formatter = parser._get_formatter()
    for action in optionals(parser):
        first = action.option_strings[0]
        twin = other_spelling(first)
        if twin:
            assert twin in action.option_strings, (name, first)
        listed = formatter._format_action_invocation(action)     # what --help shows for the flag
        assert listed.split()[0] == first and not any(o in listed for o in action.option_strings[1:]), listed


def test_the_authors_readme_commands_parse_as_written():
    p = main_supcon.get_args_parser()
    base = p.parse_args('--batch_size 512 --learning_rate 0.5 --temp 0.1 --cosine'.split())
    assert (base.batch_size, base.learning_rate, base.temp, base.cosine) == (512, 0.5, 0.1, True)
    ft = p.parse_args('--batch_size 128 --learning_rate 0.1 --temp 0.1 --cosine --trial 0 --dataset cifar100 '
                      '--model resnet34 --alpa_finetune --ckp x.pth --data_folder d --syncBN'.split())
    assert ft.alpa_finetune and ft.data_root == 'd' and ft.sync_bn and ft.model == 'resnet34'
    assert p.parse_args(['--alpa_train']) == p.parse_args(['--alpa-train'])


@pytest.mark.parametrize('name', ['main_supcon', 'main_linear', 'feature_collect', 'CSD'])
def test_data_root_and_id_classes_are_one_family_everywhere(name):
    parser = PARSERS[name]()
    extra = ['--ckp', 'x.pth'] if name != 'main_supcon' else []
    for spelling in ('--data-root', '--data_folder', '--data_root'):
        assert parser.parse_args([spelling, 'r', *extra]).data_root == 'r'
    for spelling in ('--id-classes', '--id_classes'):
        assert parser.parse_args([spelling, '0', '3', *extra]).id_classes == [0, 3]


def test_eval_takes_words_and_a_supcon_model_has_no_classifier():
    p = main_supcon.get_args_parser()
    assert (p.parse_args([]).eval, p.parse_args([]).eval_k) == ('knn', 20)
    with pytest.raises(SystemExit):
        p.parse_args(['--eval', '-1'])
    with pytest.raises(UserError, match='--eval classifier: a SupCon model has no classifier'):
        main_supcon.finalize_args(p.parse_args(['--eval', 'classifier']))
    ce = main_ce.get_args_parser().parse_args(['--eval', 'classifier'])
    assert main_supcon.finalize_args(ce).eval == 'classifier'


def test_temperature_s_is_documented_as_an_inverse_temperature():
    action = next(a for a in optionals(main_supcon.get_args_parser()) if a.dest == 'temperature_s')
    assert 'inverse temperature' in action.help and 'multiplied' in action.help


def test_a_shown_name_with_an_underscore_is_refused():
    with pytest.raises(ValueError, match='hyphens'):
        Parser().add_argument('--batch_size')
    assert other_spelling('--a_b_c') == '--a-b-c' and other_spelling('--a-b') == '--a_b'
    assert other_spelling('--cosine') is None
