/* Firmware example (one input, one classifier output): run the generated PFP library once on the input in input_data.h,
 * print the predictive mean and variance of every logit, then the class, its probability and the decision over
 * semihosting (QEMU prints it).
 * Startup code and linker script come with the generated library (OUT/firmware/, for Cortex-M targets). */
#include <math.h>
#include <stdio.h>

#include "pfp_model.h"
#include "input_data.h" /* const float pfp_example_input[PFP_MODEL_INPUT0_ELEMENTS] */

#define ACCEPT_PROBABILITY 0.9f /* below it the device abstains (asks again, defers to a human, ...) */

static float mean[PFP_MODEL_OUTPUT0_ELEMENTS];
static float var[PFP_MODEL_OUTPUT0_ELEMENTS];

/* Probit approximation of the class probabilities of Gaussian logits: softmax(mean / sqrt(1 + pi var / 8)).
 * Returns the most probable class and writes its probability. (Compile with --outputs probs to have the
 * library compute all of them.) */
static int predict(const float* logit_mean, const float* logit_var, int classes, float* probability) {
  float scaled[PFP_MODEL_OUTPUT0_ELEMENTS];
  float largest, sum = 0.0f;
  int k, best = 0;
  for (k = 0; k < classes; ++k) {
    scaled[k] = logit_mean[k] / sqrtf(1.0f + 0.39269908f * logit_var[k]);
    if (scaled[k] > scaled[best]) best = k;
  }
  largest = scaled[best];
  for (k = 0; k < classes; ++k) sum += expf(scaled[k] - largest);
  *probability = 1.0f / sum; /* exp(0) / sum */
  return best;
}

int main(int argc, char** argv) {
  int i, best;
  float probability;
  (void)argc; /* pfpc's startup passes the semihosting command line; unused here */
  (void)argv;
  pfp_model_run(pfp_example_input, mean, var, NULL);
  for (i = 0; i < PFP_MODEL_OUTPUT0_ELEMENTS; ++i) {
    printf("%d mean %.9g var %.9g\n", i, (double)mean[i], (double)var[i]);
  }
  best = predict(mean, var, PFP_MODEL_OUTPUT0_ELEMENTS, &probability);
  printf("class %d probability %.6f %s\n", best, (double)probability, probability >= ACCEPT_PROBABILITY ? "accept" : "abstain");
  return 0;
}
