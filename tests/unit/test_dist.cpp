// dist/placement: pipeline layer splits and --layers parsing.
#include <gtest/gtest.h>

#include "zmlx/core/error.h"
#include "zmlx/dist/placement.h"

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
