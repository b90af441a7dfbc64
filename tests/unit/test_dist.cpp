// dist/placement: pipeline layer splits and --layers parsing; device choice of ranks.
#include <gtest/gtest.h>

#include <cstdlib>

#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/dist/placement.h"
#include "zmlx/ops/backend.h"

using namespace zmlx;
using Ranges = std::vector<std::pair<int64_t, int64_t>>;

TEST(DistPlacement, SplitByBytesBalancesAndCovers) {
  EXPECT_EQ(dist::split_layers_by_bytes({10, 10, 10, 10}, 2), (Ranges{{0, 2}, {2, 4}}));
  EXPECT_EQ(dist::split_layers_by_bytes({30, 10, 10, 10}, 2), (Ranges{{0, 1}, {1, 4}}));
  EXPECT_EQ(dist::split_layers_by_bytes({1, 1, 1, 1, 1, 100}, 2), (Ranges{{0, 5}, {5, 6}}));
  // Every stage gets at least one layer even when one layer dominates.
  EXPECT_EQ(dist::split_layers_by_bytes({100, 1, 1}, 3), (Ranges{{0, 1}, {1, 2}, {2, 3}}));
  const auto r = dist::split_layers_by_bytes(std::vector<uint64_t>(48, 7), 4);
  ASSERT_EQ(r.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(r[i], (std::pair<int64_t, int64_t>{int64_t(12 * i), int64_t(12 * i + 12)}));
  EXPECT_THROW(dist::split_layers_by_bytes({1, 1}, 3), Error);
}

TEST(DistPlacement, ParseLayerRanges) {
  EXPECT_EQ(dist::parse_layer_ranges("0-23,24-47", 48, 2), (Ranges{{0, 24}, {24, 48}}));
  EXPECT_EQ(dist::parse_layer_ranges("0,1-3", 4, 2), (Ranges{{0, 1}, {1, 4}}));
  EXPECT_THROW(dist::parse_layer_ranges("0-23,25-47", 48, 2), Error);  // gap
  EXPECT_THROW(dist::parse_layer_ranges("0-23,24-46", 48, 2), Error);  // does not reach the end
  EXPECT_THROW(dist::parse_layer_ranges("0-47", 48, 2), Error);        // one range for two ranks
  EXPECT_THROW(dist::parse_layer_ranges("0-x,1-2", 3, 2), Error);
  EXPECT_THROW(dist::parse_layer_ranges("3-1,2-4", 5, 2), Error);
}

TEST(DistPlacement, Describe) {
  dist::Placement p;
  EXPECT_EQ(p.describe(), "single process");
  EXPECT_TRUE(p.owns_layer(5) && p.first_stage() && p.last_stage());
  p.mode = dist::Mode::Pipeline;
  p.rank = 1;
  p.size = 2;
  p.stages = {{0, 24}, {24, 48}};
  EXPECT_EQ(p.describe(), "rank 1/2 layers 24-47");
  EXPECT_FALSE(p.owns_layer(3));
  EXPECT_TRUE(p.owns_layer(24));
  EXPECT_EQ(p.logits_rank(), 1);
  EXPECT_EQ(p.tp_count(), 1);
  p.mode = dist::Mode::Tensor;
  EXPECT_EQ(p.describe(), "rank 1/2 tensor shard 2/2");
  EXPECT_EQ(p.tp_index(), 1);
  EXPECT_EQ(p.logits_rank(), 0);
}

TEST(DistPlacement, DescribeNamesTheDevice) {
  dist::Placement p;
  p.mode = dist::Mode::Tensor;
  p.rank = 1;
  p.size = 2;
  p.devices = {"cuda:0 (GPU A)", "cuda:1 (GPU B)"};
  EXPECT_EQ(p.describe(), "rank 1/2 tensor shard 2/2 on cuda:1 (GPU B)");
}

TEST(DistPlacement, LocalRankFromTheLauncher) {
  const char* saved = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const std::string keep = saved ? saved : "";
  unsetenv("OMPI_COMM_WORLD_LOCAL_RANK");
  unsetenv("MPI_LOCALRANKID");
  unsetenv("SLURM_LOCALID");
  EXPECT_EQ(dist::local_rank(5), 5);  // no launcher variable: the world rank
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
  EXPECT_EQ(dist::local_rank(5), 1);
  if (saved) setenv("OMPI_COMM_WORLD_LOCAL_RANK", keep.c_str(), 1);
  else unsetenv("OMPI_COMM_WORLD_LOCAL_RANK");
}

namespace {
// One rank: broadcasts are no-ops, as MPI's with a single rank.
class SoloComm final : public dist::Communicator {
 public:
  std::string kind() const override { return "solo"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::vector<std::string>& hosts() const override { return hosts_; }
  void allreduce_sum(void*, int64_t, DType) override {}
  void send(const void*, size_t, int) override {}
  void recv(void*, size_t, int) override {}
  void broadcast(void*, size_t, int, bool) override {}
  void barrier(double) override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }

 private:
  std::vector<std::string> hosts_{"here"};
};
}  // namespace

TEST(DistPlacement, CpuRanksGetTheCpuBackendAndListTheirDevice) {
  dist::Placement p;
  p.mode = dist::Mode::Pipeline;
  p.comm = std::make_shared<SoloComm>();
  EXPECT_EQ(p.comm->all_gather_string("cpu x"), std::vector<std::string>{"cpu x"});
  auto be = make_backend_for_ranks("cpu", p);
  EXPECT_EQ(be->device(), Device::CPU);
  EXPECT_EQ(be->native_stream(), nullptr);
  EXPECT_EQ(p.comm->kind(), "solo");  // CPU ranks keep the MPI-style transport
  ASSERT_EQ(p.devices.size(), 1u);
  EXPECT_EQ(p.devices[0], be->name());
}
