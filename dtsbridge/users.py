"""Whose files, and where: the user policy and path rules under the two roots.

:class:`Users` decides whether a request may name a user (a valid KBase name, a
datastore folder that is a real folder, an existing user, a folder made for it
when the checker does not require one) and who owns the copied files (the
``[ownership]`` mode: the service, a fixed uid/gid, or the user's system account).
The module functions turn a requested path into a canonical path relative to
``dts_root``. All of it blocks on the filesystem or the passwd database, so the
asynchronous methods run it through ``run_in_thread``; the engine does the real
opening (component by component, never following a link).
"""

from __future__ import annotations

import os
import pwd
import stat

from dtsbridge import engine, errors
from dtsbridge.config import Config
from dtsbridge.interfaces import ThreadRunner, UserChecker


class Users:
    """The user checks of a request and the ownership of a user's copied files."""

    def __init__(self, config: Config, checker: UserChecker, run_in_thread: ThreadRunner) -> None:
        self.config = config
        self.checker = checker
        self.run_in_thread = run_in_thread

    def ownership(self, user: str) -> tuple[int | None, int | None]:
        """The uid and gid the copied files get (None: the service's own); blocking in ``passwd`` mode."""
        if self.config.ownership == "fixed":
            return self.config.uid, self.config.gid
        if self.config.ownership == "passwd":
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise errors.TransferError(errors.USER_NOT_FOUND, f"user {user!r} has no system account "
                                           "([ownership] mode = passwd gives files to it)") from None
            return pw.pw_uid, pw.pw_gid
        return None, None

    async def check(self, user: str) -> None:
        """Refuse (:class:`~dtsbridge.errors.Refused`) a user no copy may be made for; make its folder if needed."""
        if not engine.valid_username(user):
            raise errors.Invalid("target_user is not a valid KBase username "
                                 "(a lowercase letter, then lowercase letters, digits or _; at most 100)",
                                 reason=errors.BAD_REQUEST)
        # A datastore folder that is a link or not a folder is refused whatever says the user exists.
        if not await self.run_in_thread(user_folder_safe, self.config.user_root, user):
            raise errors.Forbidden(f"the datastore folder of {user!r} is a symbolic link or not a folder",
                                   reason=errors.UNSAFE_DESTINATION)
        if not await self.checker.exists(user):
            raise errors.Invalid(f"user {user!r} does not exist", reason=errors.USER_NOT_FOUND)
        try:
            # (only a passwd lookup blocks; it also tells a missing account early, as a refusal)
            uid, gid = (await self.run_in_thread(self.ownership, user) if self.config.ownership == "passwd"
                        else self.ownership(user))
            if self.config.users_check != "directory":
                await self.run_in_thread(engine.ensure_dir, self.config.user_root, [user], uid, gid)
        except errors.TransferError as e:
            raise errors.refused(e) from None


def user_folder_safe(user_root: str, user: str) -> bool:
    """False when ``user_root/<user>`` exists as anything but a real folder (a link, a file...); blocking."""
    try:
        st = os.lstat(os.path.join(user_root, user))
    except (FileNotFoundError, NotADirectoryError):
        return True  # absent: the user check decides (and may create it)
    return stat.S_ISDIR(st.st_mode)


def staging_rel(dts_root: str, path: str) -> str:
    """``path`` (relative to ``dts_root`` or absolute inside it) as a canonical relative path; blocking."""
    return engine.normalize_relpath(relative_to_root(dts_root, path))


def relative_to_root(dts_root: str, path: str) -> str:
    """Strip the DTS root from an absolute path for a syntax check (the real check opens the folder)."""
    if path.startswith("/"):
        for root in {os.path.normpath(dts_root), os.path.realpath(dts_root)}:
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return path[len(root):].lstrip("/") or "."
        raise errors.TransferError(errors.OUTSIDE_DTS_AREA, f"{path!r} is not inside the DTS area")
    return path
