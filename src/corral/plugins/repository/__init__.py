"""The repository plugin: put a repository into a sandbox, mounted or as a filtered copy.

Configure one repository for every sandbox with ``[plugins.repository]`` (the keys of
:class:`Repository`, with ``credentials.token_env`` naming the variable that holds a
token), or give repositories to the sandboxes created in a block::

    from corral.plugins.repository import Repository, using

    with using(Repository("./app", mode="copy", exclude=[".git"], git_user_name="bot")):
        sandbox = corral.create()

git inside the sandbox gets the user name and email, ``safe.directory`` for each
target, and the token only through a credential helper reading a private file.
"""

from .model import Credentials, CredentialsSettings, Repository, RepositorySettings
from .plugin import RepositoryPlugin, using

__all__ = [
    "Credentials",
    "CredentialsSettings",
    "Repository",
    "RepositoryPlugin",
    "RepositorySettings",
    "plugin",
    "using",
]

plugin = RepositoryPlugin()
