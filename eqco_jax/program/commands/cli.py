"""How every command of eqco-jax starts: its command line read by absl
flags, a mistyped name answered with the nearest right one, and TensorFlow
imported without what it does not need.

Every command (the program, the export, the benchmarks, the K sweep) has a
``define_flags(flag_values)`` function and a ``main(flags)``, and runs with
``run(main, define_flags)``; another command (or a test) calls it from
Python with the flags of :func:`parse`, parsed from a list as a shell would
pass them, without touching the global flags. A mistake on the command line
ends :func:`run` with one sentence on stderr (``error: ...``) and exit
status 1, before the command has imported or touched anything else; so does
a ``UserError`` the command raises. ``--help`` prints the command's own
docstring as plain text and its flags (:func:`help_text`), and exits 0.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import ml_collections
from absl import app
from absl import flags
from ml_collections.config_flags import config_flags

from eqco_jax.core.errors import UserError, exception_chain

DefineFlags = Callable[[flags.FlagValues], None]


def run(main: Callable[[flags.FlagValues], None],
        define_flags: DefineFlags) -> None:
  """Defines the command's flags (``define_flags(flags.FLAGS)``), parses
  the command line with :func:`parse_command_line` and runs
  ``main(flags.FLAGS)``; positional arguments are refused, and a UserError
  ends the command with its one sentence."""
  check_flagfiles(sys.argv)  # (read while a config flag is defined)
  if asks_for_help(sys.argv):
    print(help_text(sys.modules["__main__"].__doc__ or "", define_flags))
    sys.exit(0)
  define_flags(flags.FLAGS)

  def absl_main(argv: list[str]) -> None:
    if len(argv) > 1:
      sys.exit(f"error: unexpected arguments {argv[1:]}; every option is a "
               "--flag (--helpfull lists them).")
    try:
      main(flags.FLAGS)
    except UserError as error:
      sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # a Ctrl-C the command could not stop at a step
      sys.exit("error: stopped by Ctrl-C; run the same command again: it "
               "resumes from the newest checkpoint.")

  app.run(absl_main, flags_parser=parse_command_line)


# absl's spellings of --help (its own help flag exits 1, and lists only the
# flags that the __main__ module defines: none of ours).
_HELP = ("help", "helpshort", "h", "?")


def asks_for_help(argv: Sequence[str]) -> bool:
  """Whether ``argv`` (before any ``--``) asks for ``--help``."""
  for arg in argv[1:]:
    if arg == "--":
      return False
    if arg.startswith("-") and arg.lstrip("-") in _HELP:
      return True
  return False


def help_text(doc: str, define_flags: DefineFlags) -> str:
  """A command's ``--help``: ``doc`` (its module docstring) as plain text,
  then the flags ``define_flags`` defines, as absl describes them."""
  own = flags.FlagValues()
  define_flags(own)
  described = []
  for module in own.flags_by_module_dict():
    # module_help: a blank line, "MODULE:", then the flags.
    described += own.module_help(module).strip("\n").splitlines()[1:]
  return f"{plain_text(doc).strip()}\n\nflags:\n" + "\n".join(described)


def plain_text(doc: str) -> str:
  """``doc`` without reStructuredText markup: ``:role:`x``` and ```x``` as
  x."""
  doc = re.sub(r":[a-z:]+:`~?([^`]+)`", r"\1", doc)
  return re.sub(r"``([^`]+)``", r"\1", doc)


def nearest_name(name: str, names: Iterable[str]) -> str | None:
  """The one of ``names`` closest to the mistyped ``name`` (as a whole, or
  one of its ``_``-separated words); None when none is close."""

  def likeness(candidate: str) -> tuple[float, float]:
    whole = difflib.SequenceMatcher(None, name, candidate).ratio()
    words = max(difflib.SequenceMatcher(None, name, word).ratio()
                for word in candidate.split("_"))
    return max(whole, words), whole

  nearest = max(names, key=likeness, default=None)
  if nearest is None or likeness(nearest)[0] < 0.75:
    return None
  return nearest


def check_field(config: ml_collections.ConfigDict, path: str) -> None:
  """Raises UserError when ``config`` has no field at the dotted ``path``
  (as ``--config.PATH=VALUE`` names it), naming the nearest field."""
  node, parts = config, path.split(".")
  for depth, part in enumerate(parts):
    prefix = ".".join(parts[:depth] + [""])
    if not isinstance(node, ml_collections.ConfigDict):
      raise UserError(f"config has no field {path}; {prefix[:-1]} is a "
                      "value, not a group of fields.")
    name = part.split("[")[0]  # FIELD[INDEX]: the override's parser judges
    if name not in node:
      nearest = nearest_name(name, node.keys())
      advice = (f"did you mean {prefix}{nearest}?" if nearest else
                "check its name in the config file.")
      raise UserError(f"config has no field {prefix}{name}; {advice}")
    if name != part:
      return
    node = node[name]


def parse_command_line(argv: list[str]) -> list[str]:
  """``argv`` parsed into ``flags.FLAGS``, config files loaded; returns the
  positional arguments.

  A mistake (an unknown or missing flag, a bad flag value, a config file
  that does not load, an unknown variant or config field) ends the process
  before anything else runs: one sentence on stderr, ``error: ...``, exit
  status 1.
  """
  try:
    _check_config_flags(flags.FLAGS, argv)
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as error:
    sys.exit(f"error: {_unknown_flag(error.flagname, flags.FLAGS)}")
  except flags.Error as error:
    sys.exit(f"error: {_flag_error(error, flags.FLAGS)}")
  except IndexError as error:  # ml_collections: an item of a tuple field
    sys.exit(f"error: {error}; set a tuple field whole, as in "
             "--config.augment.crop_scale='(0.3, 1.0)'.")


def check_flagfiles(argv: Sequence[str]) -> None:
  """Ends the process with one sentence if a ``--flagfile`` of ``argv``
  cannot be read. For modules that define a config-file flag:
  ml_collections reads the flag files while it defines the flag, before
  :func:`parse_command_line` runs."""
  try:
    flags.FlagValues().read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error as error:
    reason = str(error).replace("ERROR:: ", "")
    sys.exit(f"error: cannot read a --flagfile ({reason}); give the path "
             "of a file of --flag=value lines.")


def _unknown_flag(name: str, flag_values: flags.FlagValues) -> str:
  group = name.split(".")[0]  # --config.FIELD is defined by --config
  if group != name and group in flag_values:
    return (f"--{name} sets a field of --{group}, which is missing; add "
            f"--{group} before it.")
  nearest = nearest_name(name, list(flag_values))
  if nearest:
    return f"unknown flag --{name}; did you mean --{nearest}?"
  return f"unknown flag --{name}; --helpfull lists the flags."


def _flag_error(error: flags.Error, flag_values: flags.FlagValues) -> str:
  """What absl refused, in one sentence where it is a user's mistake."""
  mistake = _user_error(error)
  if mistake is not None:
    return str(mistake)
  missing = _missing(flag_values) if flag_values.is_parsed() else []
  if missing:  # every flag parsed: absl's validators refused these
    names = " and ".join(f"--{name}" for name in missing)
    return (f"{names} {'is' if len(missing) == 1 else 'are'} missing; add "
            f"{'it' if len(missing) == 1 else 'them'} to the command "
            "(--helpfull says what each flag takes).")
  return str(error)


def _user_error(error: BaseException | None) -> UserError | None:
  """The innermost UserError that ``error`` was raised from or while
  handling: a config file's own, which ml_collections and absl wrap."""
  found = [e for e in exception_chain(error) if isinstance(e, UserError)]
  return found[-1] if found else None


def _missing(flag_values: flags.FlagValues) -> list[str]:
  """The unset flags a validator refuses (absl's required flags)."""

  def refuses(validator: Any) -> bool:
    try:
      validator.verify(flag_values)
    except flags.ValidationError:
      return True
    return False

  return [name for name in flag_values
          if flag_values[name].name == name  # not a short name
          and flag_values[name].value is None
          and any(map(refuses, flag_values[name].validators))]


def _check_config_flags(flag_values: flags.FlagValues,
                        argv: Sequence[str]) -> None:
  """Makes every config-file flag (ml_collections') refuse, as UserErrors,
  a file that does not load and an override of a field its config lacks."""
  argv = flag_values.read_flags_from_files(list(argv), force_gnu=False)
  for name in list(flag_values):
    flag = flag_values[name]
    if isinstance(flag.parser, config_flags.ConfigFileFlagParser):
      flag.parser = _CheckedConfigParser(flag.parser, name,
                                         _overrides(argv, name))


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """The dotted fields that ``--NAME.FIELD=VALUE`` (or ``--noNAME.FIELD``)
  set in ``argv``, as ml_collections finds them."""
  paths = []
  for arg in argv[1:]:
    if arg == "--":
      break
    flag = arg.lstrip("-").split("=", 1)[0]
    for prefix in (f"{name}.", f"no{name}."):
      if arg.startswith("-") and flag.startswith(prefix):
        paths.append(flag[len(prefix):])
  return paths


class _CheckedConfigParser(flags.ArgumentParser):
  """ml_collections' parser of a config-file flag, whose mistakes are
  UserErrors (absl reports them as the flag's bad value): a file that does
  not load, and an override of a field the config does not have."""

  def __init__(self, parser: flags.ArgumentParser, name: str,
               overrides: list[str]):
    self.parser = parser
    self.name = name
    self.overrides = overrides

  def parse(self, argument: str) -> Any:
    config = self.parser.parse(argument)
    try:  # ml_collections defers a failed load until the config's first use
      hasattr(config, "keys")
    except OSError as error:
      raise UserError(self._unloadable(argument.split(":", 1)[0], error)
                      ) from error
    if isinstance(config, ml_collections.ConfigDict):
      for path in self.overrides:
        check_field(config, path)
    return config

  def flag_type(self) -> str:
    return self.parser.flag_type()

  def _unloadable(self, path: str, error: OSError) -> str:
    # The storage layer only here: it costs 0.16 s of every start.
    from eqco_jax.program.files import storage  # pylint: disable=g-import-not-at-top
    if not storage.path(path).is_file():
      return f"no config file {path!r}; check the path given to --{self.name}."
    reason = str(error.__cause__ or error).strip().splitlines()[-1].strip()
    return (f"cannot load config file {path!r} ({reason}); check the file "
            f"given to --{self.name}.")


def parse(define_flags: DefineFlags, argv: Sequence[str]
          ) -> flags.FlagValues:
  """``argv`` (flags as a shell passes them) parsed into flags of their own,
  defined by ``define_flags``."""
  parsed, command_line = flags.FlagValues(), ["command", *argv]
  # ml_collections finds a config flag's overrides in sys.argv.
  saved, sys.argv = sys.argv, command_line
  try:
    define_flags(parsed)
    parsed(command_line)
  finally:
    sys.argv = saved
  return parsed


# What TensorFlow's Keras imports, when installed, for integrations the
# programs never use: about 3 s of every start with all three installed.
# (Keras itself stays: clu's TensorBoard writer needs ``tf.keras``, and
# Keras imported later would bring them all in.)
_NOT_FOR_TENSORFLOW = ("sklearn", "pandas", "matplotlib")


def import_tensorflow() -> Any:
  """``tensorflow``, imported while scikit-learn, pandas and matplotlib look
  absent to it (Keras guards those imports); they import normally
  afterwards."""
  hidden = [name for name in _NOT_FOR_TENSORFLOW if name not in sys.modules]
  for name in hidden:
    sys.modules[name] = None  # an ImportError for whoever imports it now
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top
  finally:
    for name in hidden:
      if sys.modules.get(name, "") is None:
        del sys.modules[name]
  return tensorflow
