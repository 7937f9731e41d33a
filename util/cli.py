"""One spelling per flag. Every entry script's parser is a :class:`Parser`: a flag is written
with hyphens (``--data-root``, ``--batch-size``) in ``--help``, in the docs and in every
message, and its underscore spelling (the authors' and SupContrast's ``--batch_size``) is
accepted as a hidden alias, as are the older names a flag lists after its first."""
import argparse
import copy


def other_spelling(option):
    """``--batch_size`` <-> ``--batch-size``; None for a flag without either character."""
    body = option[2:]
    if '_' in body:
        return '--' + body.replace('_', '-')
    if '-' in body:
        return '--' + body.replace('-', '_')
    return None


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag by its first name only; the aliases stay accepted but unlisted."""

    def _format_action_invocation(self, action):
        if action.option_strings:
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose flags have one shown spelling (the first name, with
    hyphens) and accept the underscore spelling of every name as well."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        if names and names[0].startswith('--') and '_' in names[0]:
            raise ValueError(f'{names[0]}: write the shown name with hyphens; the underscore spelling is accepted anyway')
        expanded = []
        for name in names:
            expanded.append(name)
            twin = other_spelling(name) if name.startswith('--') else None
            if twin and twin not in names:
                expanded.append(twin)
        return super().add_argument(*expanded, **kwargs)
