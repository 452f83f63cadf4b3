#include "child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <ostream>

extern char** environ;

namespace kvtier::cli {
namespace {

constexpr size_t kErrTailBytes = 4096;
constexpr size_t kOutMaxBytes = size_t{64} << 20;  // a report is a few KiB; this bounds a runaway child

class Fd {
 public:
  Fd() = default;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

struct Pipe {
  Fd read, write;
};

Status make_pipe(Pipe* p) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return io_error(std::string("pipe2: ") + std::strerror(errno));
  p->read.reset(fds[0]);
  p->write.reset(fds[1]);
  return Status::ok_status();
}

class FileActions {
 public:
  FileActions() { ::posix_spawn_file_actions_init(&actions_); }
  FileActions(const FileActions&) = delete;
  FileActions& operator=(const FileActions&) = delete;
  ~FileActions() { ::posix_spawn_file_actions_destroy(&actions_); }
  posix_spawn_file_actions_t* get() { return &actions_; }

 private:
  posix_spawn_file_actions_t actions_;
};

// Passes complete stderr lines on to `progress` and keeps the tail.
class ErrForwarder {
 public:
  ErrForwarder(std::ostream& progress, std::string_view prefix) : progress_(progress), prefix_(prefix) {}

  void add(std::string_view bytes) {
    pending_ += bytes;
    for (size_t nl = pending_.find('\n'); nl != std::string::npos; nl = pending_.find('\n')) {
      line(pending_.substr(0, nl));
      pending_.erase(0, nl + 1);
    }
  }
  std::string finish() {
    if (!pending_.empty()) line(pending_);
    pending_.clear();
    return tail_;
  }

 private:
  void line(const std::string& text) {
    progress_ << prefix_ << text << "\n" << std::flush;
    tail_ += text + "\n";
    if (tail_.size() > kErrTailBytes) tail_.erase(0, tail_.find('\n', tail_.size() - kErrTailBytes) + 1);
  }

  std::ostream& progress_;
  std::string prefix_, pending_, tail_;
};

// Reads both pipes until the child closes them.
Status drain(int out_fd, int err_fd, std::string* out, ErrForwarder* err) {
  pollfd fds[2] = {{out_fd, POLLIN, 0}, {err_fd, POLLIN, 0}};
  char buf[65536];
  while (fds[0].fd >= 0 || fds[1].fd >= 0) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return io_error(std::string("poll on the child's output: ") + std::strerror(errno));
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return io_error(std::string("reading the child's output: ") + std::strerror(errno));
      if (n == 0) {
        fds[i].fd = -1;
        continue;
      }
      if (i == 1) {
        err->add(std::string_view(buf, static_cast<size_t>(n)));
      } else {
        out->append(buf, static_cast<size_t>(n));
        if (out->size() > kOutMaxBytes)
          return io_error("the child wrote more than " + std::to_string(kOutMaxBytes) + " bytes to stdout");
      }
    }
  }
  return Status::ok_status();
}

}  // namespace

Result<std::string> program_beside_self(std::string_view name) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return io_error("cannot locate this binary through /proc/self/exe: " + ec.message());
  return (self.parent_path() / name).string();
}

Result<ChildResult> run_child(const std::vector<std::string>& argv, std::ostream& progress, std::string_view prefix) {
  Pipe out_pipe, err_pipe;
  KVT_RETURN_IF_ERROR(make_pipe(&out_pipe));
  KVT_RETURN_IF_ERROR(make_pipe(&err_pipe));
  // dup2 clears close-on-exec on 1 and 2; every pipe end itself closes at exec.
  FileActions actions;
  ::posix_spawn_file_actions_adddup2(actions.get(), out_pipe.write.get(), STDOUT_FILENO);
  ::posix_spawn_file_actions_adddup2(actions.get(), err_pipe.write.get(), STDERR_FILENO);
  std::vector<std::string> args = argv;
  std::vector<char*> c_args;
  for (std::string& a : args) c_args.push_back(a.data());
  c_args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, c_args[0], actions.get(), nullptr, c_args.data(), environ);
  out_pipe.write.reset();
  err_pipe.write.reset();
  if (rc != 0) return io_error("cannot run " + argv[0] + ": " + std::strerror(rc));
  ChildResult result;
  ErrForwarder err(progress, prefix);
  const Status read_status = drain(out_pipe.read.get(), err_pipe.read.get(), &result.out, &err);
  // Close our ends first so that a child still writing gets EPIPE rather than blocking forever.
  out_pipe.read.reset();
  err_pipe.read.reset();
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return io_error("waitpid for " + argv[0] + ": " + std::strerror(errno));
  result.err_tail = err.finish();
  KVT_RETURN_IF_ERROR(read_status);
  if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) result.signal = ::strsignal(WTERMSIG(status));
  return result;
}

}  // namespace kvtier::cli
